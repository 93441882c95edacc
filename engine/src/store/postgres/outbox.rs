//! The outbox's claims on PostgreSQL: the sends due (skipping rows other hosts lock, taking rows
//! of hosts that are gone) and an ordered port's head. Running them, reading their rows, renewing
//! locks, recording deliveries and dead letters are shared
//! ([`common::outbox`](crate::store::common::outbox)).

/// The sends due (parameters as for
/// [`Outbox::claim_outbox_by`](crate::store::common::Outbox::claim_outbox_by)): unlocked, or
/// locked by a host whose lock ran out or that is gone.
pub(super) const CLAIM_OUTBOX: &str =
    "UPDATE outbox SET locked_by = $1, locked_until = $3 WHERE id IN ( \
       SELECT o.id FROM outbox o WHERE o.status = 'pending' AND o.next_attempt_at <= $2 \
         AND (o.locked_until IS NULL OR o.locked_until < $2 OR (o.locked_by <> $1 AND NOT EXISTS ( \
           SELECT 1 FROM hosts h WHERE h.id = o.locked_by AND h.stopped_at IS NULL \
             AND h.heartbeat_at >= $6))) \
         AND NOT (o.port = ANY($5)) \
       ORDER BY o.next_attempt_at LIMIT $4 \
       FOR UPDATE OF o SKIP LOCKED) \
     RETURNING id, instance_id, port, message_type, body, expects_reply, attempts";

/// An ordered port's head, locked, and whether the host holding it beats (parameters as for
/// [`Outbox::claim_ordered_by`](crate::store::common::Outbox::claim_ordered_by)).
pub(super) const CLAIM_ORDERED: &str =
    "SELECT o.id, o.instance_id, o.port, o.message_type, o.body, o.expects_reply, o.attempts, \
     o.status, o.next_attempt_at, o.locked_by, o.locked_until, EXISTS (SELECT 1 FROM hosts h \
       WHERE h.id = o.locked_by AND h.stopped_at IS NULL AND h.heartbeat_at >= $2) AS holder_alive \
     FROM outbox o WHERE o.port = $1 AND o.status IN ('pending', 'held', 'give_up') \
     ORDER BY o.seq LIMIT 1 FOR UPDATE";
