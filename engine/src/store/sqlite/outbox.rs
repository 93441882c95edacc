//! The outbox's claims on SQLite: the sends due and an ordered port's head. Running them, reading
//! their rows, renewing locks, recording deliveries and dead letters are shared
//! ([`common::outbox`](crate::store::common::outbox)).

/// The sends due (parameters as for
/// [`Outbox::claim_outbox_by`](crate::store::common::Outbox::claim_outbox_by)).
pub(super) const CLAIM_OUTBOX: &str =
    "UPDATE outbox SET locked_by = $1, locked_until = $3 WHERE id IN ( \
       SELECT id FROM outbox WHERE status = 'pending' AND next_attempt_at <= $2 \
         AND (locked_until IS NULL OR locked_until < $2) \
         AND port NOT IN (SELECT value FROM json_each($5)) \
       ORDER BY next_attempt_at LIMIT $4) \
     RETURNING id, instance_id, port, message_type, body, expects_reply, attempts";

/// An ordered port's head (parameters as for
/// [`Outbox::claim_ordered_by`](crate::store::common::Outbox::claim_ordered_by)); one host a
/// file, so a holder is always alive.
pub(super) const CLAIM_ORDERED: &str =
    "SELECT id, instance_id, port, message_type, body, expects_reply, attempts, status, \
     next_attempt_at, locked_by, locked_until, 1 AS holder_alive FROM outbox \
     WHERE port = $1 AND status IN ('pending', 'held', 'give_up') ORDER BY seq LIMIT 1";
