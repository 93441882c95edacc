//! The console's read-only queries ([`ConsoleReads`]), once for both backends: the overview, the
//! instance list with its filters and keyset pagination, an instance's waits, the map, and the
//! lists of messages, held sends and hosts.
//!
//! Each statement is written to answer from an index of migration `console_indexes` (or an older
//! one) and to read at most a page of rows; `docs/console.md` gives the page times with a million
//! instances. The fragment in which the backends differ (a time cut to the minute) is [`ConsoleSql`]'s.

use chrono::{DateTime, Duration, Utc};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};
use uuid::Uuid;

use super::operator::{summary_row, SUMMARY_COLUMNS};
use super::{Backend, Bind, RowOf};
use crate::store::console::*;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::*;

/// The SQL in which the backends differ, for the console.
pub(in crate::store) trait ConsoleSql {
    /// A time column cut to the minute, as text `YYYY-MM-DDTHH:MM` (UTC).
    fn minute(column: &str) -> String;
}

impl ConsoleSql for SqliteStore {
    fn minute(column: &str) -> String {
        // Times are ISO-8601 UTC text: the minute is its first 16 characters.
        format!("substr({column}, 1, 16)")
    }
}

impl ConsoleSql for PostgresStore {
    fn minute(column: &str) -> String {
        format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI')")
    }
}

/// A value bound to a statement built at run time.
pub(in crate::store) enum Param {
    Text(String),
    Count(u32),
    Time(DateTime<Utc>),
    Id(Uuid),
}

/// `text` for a `LIKE` pattern that matches it anywhere, its wildcards escaped (with `\`).
fn contains_pattern(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// Every status, as an SQL list.
const ALL_STATUSES: &str =
    "('running', 'dehydrated', 'suspended', 'completed', 'failed', 'terminated')";

/// Every status an instance can have, each read apart in the instance list.
const STATUSES: [InstanceStatus; 6] = [
    InstanceStatus::Running,
    InstanceStatus::Dehydrated,
    InstanceStatus::Suspended,
    InstanceStatus::Completed,
    InstanceStatus::Failed,
    InstanceStatus::Terminated,
];

/// The instance list's statement and its parameters (numbered from `$1`): at most `rows` rows,
/// newest change first, after `after`.
///
/// No index is kept on `updated_at` alone, nor on the step: every persistence point rewrites both,
/// and each index on them would be rewritten with them. So the list is read per status, each
/// status along `instances_by_status (status, updated_at)` in order, at most `rows` of each, and
/// the statuses are merged; a status other than `running` may instead be read through the partial
/// index `instances_by_definition`, which a point of a running instance does not touch. With an
/// error filter, the instances that have an error are read in order along `instances_with_error`.
pub(in crate::store) fn instance_list<B: Backend>(
    filter: &InstanceFilter,
    after: Option<Cursor>,
    rows: u64,
) -> (String, Vec<Param>) {
    let (terms, params) = instance_terms::<B>(filter, after);
    let statuses: Vec<Option<InstanceStatus>> = match (filter.status, &filter.error) {
        (Some(status), _) => vec![Some(status)],
        // Instances with an error are read in order along instances_with_error.
        (None, Some(_)) => vec![None],
        (None, None) => STATUSES.into_iter().map(Some).collect(),
    };
    let of_status = |status: &Option<InstanceStatus>| {
        let status = match status.map(InstanceStatus::as_str) {
            None => String::new(),
            Some("running") => " AND status = 'running'".to_owned(),
            // Written out, `<> 'running'` lets the planner use the partial index.
            Some(s) => format!(" AND status = '{s}' AND status <> 'running'"),
        };
        format!(
            "SELECT {SUMMARY_COLUMNS} FROM instances WHERE {}{status}{terms} \
             ORDER BY updated_at DESC, id DESC LIMIT {rows}",
            B::TRUE
        )
    };
    let sql = match statuses.as_slice() {
        [one] => of_status(one),
        all => format!(
            "SELECT * FROM ({}) AS l ORDER BY updated_at DESC, id DESC LIMIT {rows}",
            all.iter()
                .enumerate()
                .map(|(n, s)| format!("SELECT * FROM ({}) AS s{n}", of_status(s)))
                .collect::<Vec<_>>()
                .join(" UNION ALL ")
        ),
    };
    (sql, params)
}

/// The instance list's conditions other than the status, each starting with ` AND `, and their
/// parameters, numbered from `$1`.
fn instance_terms<B: Backend>(
    filter: &InstanceFilter,
    after: Option<Cursor>,
) -> (String, Vec<Param>) {
    let mut terms: Vec<String> = Vec::new();
    let mut params: Vec<Param> = Vec::new();
    let mut bind = |p: Param| {
        params.push(p);
        format!("${}", params.len())
    };
    if let Some(o) = &filter.orchestration {
        terms.push(format!("orchestration = {}", bind(Param::Text(o.clone()))));
    }
    if let Some(v) = filter.version {
        terms.push(format!("version = {}", bind(Param::Count(v))));
    }
    if let Some(s) = &filter.step {
        terms.push(format!("step = {}", bind(Param::Text(s.clone()))));
    }
    if let Some((k, v)) = &filter.correlation {
        // Through `subscriptions_route (message_type, correlation)`: the message types waited on
        // with correlation keys are those of `subscription_keys`.
        let n = bind(Param::Text(format!("{k}={v}")));
        terms.push(format!(
            "id IN (SELECT instance_id FROM subscriptions WHERE message_type IN \
             (SELECT message_type FROM subscription_keys) AND correlation = {n} \
             AND instance_id IS NOT NULL)"
        ));
    }
    if let Some(t) = filter.from {
        terms.push(format!("updated_at >= {}", bind(Param::Time(t))));
    }
    if let Some(t) = filter.to {
        terms.push(format!("updated_at < {}", bind(Param::Time(t))));
    }
    if let Some(e) = &filter.error {
        // `IS NOT NULL` lets the planner read the index of instances with an error only.
        let n = bind(Param::Text(contains_pattern(e)));
        terms.push(format!(
            "last_error IS NOT NULL AND last_error {} {n} ESCAPE '\\'",
            B::ILIKE
        ));
    }
    if let Some(c) = after {
        let t = bind(Param::Time(c.updated_at));
        let id = bind(Param::Id(c.id));
        // Index-friendly on both backends: a range on updated_at, the tie broken by id.
        terms.push(format!(
            "updated_at <= {t} AND (updated_at < {t} OR id < {id})"
        ));
    }
    let terms = terms.iter().map(|t| format!(" AND {t}")).collect();
    (terms, params)
}

/// The console's queries over a [`Backend`]; `impl ConsoleReads` for each store hands over here.
pub(in crate::store) trait ConsoleRoom: Backend + ConsoleSql
where
    for<'c> &'c mut <Self::Db as Database>::Connection: Executor<'c, Database = Self::Db>,
    for<'c> &'c sqlx::Pool<Self::Db>: Executor<'c, Database = Self::Db>,
    for<'q> <Self::Db as Database>::Arguments<'q>: IntoArguments<'q, Self::Db>,
    for<'q> &'q str: Encode<'q, Self::Db> + Type<Self::Db>,
    String: Bind<Self::Db>,
    i64: Bind<Self::Db>,
    (i64,): for<'r> FromRow<'r, RowOf<Self>>,
{
    /// Runs `sql` with `params` on the read pool.
    async fn fetch(
        &self,
        what: &'static str,
        sql: &str,
        params: Vec<Param>,
    ) -> StoreResult<Vec<RowOf<Self>>> {
        let mut q = sqlx::query(sql);
        for p in params {
            q = match p {
                Param::Text(t) => q.bind(t),
                Param::Count(n) => q.bind(Self::count(n)),
                Param::Time(t) => q.bind(Self::time(t)),
                Param::Id(id) => q.bind(Self::uuid(id)),
            };
        }
        q.fetch_all(self.reads())
            .await
            .map_err(|e| Self::map_err(what, e))
    }

    /// Runs `sql` with `params` and reads each row with `read`, leaving out (with a warning)
    /// a row that cannot be read.
    async fn rows<T: Send>(
        &self,
        what: &'static str,
        sql: &str,
        params: Vec<Param>,
        read: impl Fn(&RowOf<Self>) -> StoreResult<T> + Send,
    ) -> StoreResult<Vec<T>> {
        let rows = self.fetch(what, sql, params).await?;
        Ok(readable(rows.iter().map(read), what))
    }

    /// A count.
    async fn count_of(&self, what: &'static str, sql: &str) -> StoreResult<i64> {
        let (n,): (i64,) = sqlx::query_as(sql)
            .fetch_one(self.reads())
            .await
            .map_err(|e| Self::map_err(what, e))?;
        Ok(n)
    }

    /// Counts per minute: rows of `(minute, n)`.
    fn per_minute(rows: &[RowOf<Self>]) -> StoreResult<Vec<(String, i64)>> {
        rows.iter()
            .map(|r| Ok((Self::col_text(r, "minute")?, Self::col_i64(r, "n")?)))
            .collect()
    }

    /// [`ConsoleReads::overview`].
    async fn overview(&self, now: DateTime<Utc>) -> StoreResult<Overview> {
        let hour_ago = now - Duration::hours(1);
        // The points of the last hour are those of the instances changed in it (history has no
        // index on its time: a point would write one more index), read by instances_by_status.
        let points_sql = format!(
            "SELECT {m} AS minute, COUNT(*) AS n FROM history \
             WHERE instance_id IN (SELECT id FROM instances WHERE status IN {ALL_STATUSES} \
               AND updated_at >= $1) AND at >= $1 \
             GROUP BY {m} ORDER BY {m}",
            m = Self::minute("at")
        );
        let completions_sql = format!(
            "SELECT {m} AS minute, COUNT(*) AS n FROM instances \
             WHERE status = 'completed' AND updated_at >= $1 GROUP BY {m} ORDER BY {m}",
            m = Self::minute("updated_at")
        );
        let durations_sql = format!(
            "SELECT created_at, updated_at FROM instances \
             WHERE status = 'completed' AND updated_at >= $1 \
             ORDER BY updated_at DESC LIMIT {DURATION_SAMPLE}"
        );
        // Side by side, each on a connection of the read pool: the page waits for the slowest,
        // not for their sum.
        let (points, completions, durations) = tokio::try_join!(
            self.fetch(
                "console points per minute",
                &points_sql,
                vec![Param::Time(hour_ago)]
            ),
            self.fetch(
                "console completions per minute",
                &completions_sql,
                vec![Param::Time(hour_ago)]
            ),
            self.fetch(
                "console durations",
                &durations_sql,
                vec![Param::Time(hour_ago)]
            ),
        )?;
        let mut durations_ms = readable(
            durations.iter().map(|r| {
                let took = Self::col_time(r, "updated_at")? - Self::col_time(r, "created_at")?;
                Ok(took.num_milliseconds())
            }),
            "console durations",
        );
        durations_ms.sort_unstable();
        let live_cutoff = Self::time(now - Duration::minutes(2));
        let (live_hosts,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM hosts WHERE stopped_at IS NULL AND heartbeat_at >= $1",
        )
        .bind(live_cutoff)
        .fetch_one(self.reads())
        .await
        .map_err(|e| Self::map_err("console live hosts", e))?;
        Ok(Overview {
            suspended: self
                .count_of(
                    "console suspended",
                    "SELECT COUNT(*) FROM instances WHERE status = 'suspended'",
                )
                .await?,
            points_per_minute: Self::per_minute(&points)?,
            completions_per_minute: Self::per_minute(&completions)?,
            durations_ms,
            dead_letters: self
                .count_of("console dead letters", "SELECT COUNT(*) FROM dead_letters")
                .await?,
            unrouted: self
                .count_of(
                    "console unrouted",
                    "SELECT COUNT(*) FROM messages WHERE status = 'unrouted'",
                )
                .await?,
            zombies: self
                .count_of(
                    "console zombies",
                    "SELECT COUNT(*) FROM messages WHERE status = 'zombie'",
                )
                .await?,
            held_sends: self
                .count_of(
                    "console held sends",
                    "SELECT COUNT(*) FROM outbox WHERE status = 'held'",
                )
                .await?,
            live_hosts,
        })
    }

    /// [`ConsoleReads::definition_counts`].
    async fn definition_counts(&self) -> StoreResult<Vec<DefinitionCount>> {
        self.rows(
            "console counts",
            // Every status but running from the partial index instances_by_definition alone;
            // the running ones along instances_by_status.
            "SELECT orchestration, version, status, COUNT(*) AS n FROM instances \
             WHERE status <> 'running' GROUP BY orchestration, version, status \
             UNION ALL SELECT orchestration, version, status, COUNT(*) AS n FROM instances \
             WHERE status = 'running' GROUP BY orchestration, version, status \
             ORDER BY orchestration, version, status",
            vec![],
            |r| {
                Ok(DefinitionCount {
                    orchestration: Self::col_text(r, "orchestration")?,
                    version: Self::col_u32(r, "instances", "version")?,
                    status: Self::col_word(r, "status")?,
                    count: Self::col_i64(r, "n")?,
                })
            },
        )
        .await
    }

    /// [`ConsoleReads::instances`].
    async fn instances(
        &self,
        filter: &InstanceFilter,
        after: Option<Cursor>,
        limit: u32,
    ) -> StoreResult<InstancePage> {
        // One row more than the page, to know whether there is a next one.
        let (sql, params) = instance_list::<Self>(filter, after, u64::from(limit) + 1);
        let rows = self.fetch("console instances", &sql, params).await?;
        let mut rows = readable(rows.iter().map(summary_row::<Self>), "console instances");
        let next = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(|r| Cursor {
                updated_at: r.updated_at,
                id: r.id,
            })
        } else {
            None
        };
        Ok(InstancePage { rows, next })
    }

    /// [`ConsoleReads::instance_waits`].
    async fn instance_waits(&self, id: Uuid) -> StoreResult<InstanceWaits> {
        let what = "console instance";
        let parent = self
            .fetch(
                what,
                &format!(
                    "SELECT {} AS parent FROM instances WHERE id = $1",
                    Self::uuid_or_null("parent_id")
                ),
                vec![Param::Id(id)],
            )
            .await?
            .first()
            .map(|r| Self::col_uuid_opt(r, "parent"))
            .transpose()?
            .flatten();
        let subscriptions = self
            .fetch(
                what,
                "SELECT message_type, correlation FROM subscriptions WHERE instance_id = $1 \
                 ORDER BY created_at",
                vec![Param::Id(id)],
            )
            .await?
            .iter()
            .map(|r| {
                Ok((
                    Self::col_text(r, "message_type")?,
                    Self::col_text(r, "correlation")?,
                ))
            })
            .collect::<StoreResult<_>>()?;
        let timers = self
            .fetch(
                what,
                "SELECT name, due_at FROM timers WHERE instance_id = $1 ORDER BY due_at",
                vec![Param::Id(id)],
            )
            .await?
            .iter()
            .map(|r| Ok((Self::col_text(r, "name")?, Self::col_time(r, "due_at")?)))
            .collect::<StoreResult<_>>()?;
        let messages = self
            .rows(
                what,
                &format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE instance_id = $1 \
                 ORDER BY seq LIMIT {LIST_LIMIT}"
                ),
                vec![Param::Id(id)],
                message_row::<Self>,
            )
            .await?;
        let sends = self
            .rows(
                what,
                &format!(
                    "SELECT {SEND_COLUMNS} FROM outbox WHERE instance_id = $1 \
                 ORDER BY created_at, id LIMIT {LIST_LIMIT}"
                ),
                vec![Param::Id(id)],
                send_row::<Self>,
            )
            .await?;
        let children = self
            .rows(
                what,
                &format!(
                    "SELECT {SUMMARY_COLUMNS} FROM instances WHERE parent_id = $1 \
                 ORDER BY updated_at DESC LIMIT {LIST_LIMIT}"
                ),
                vec![Param::Id(id)],
                summary_row::<Self>,
            )
            .await?;
        Ok(InstanceWaits {
            parent,
            subscriptions,
            timers,
            messages,
            sends,
            children,
        })
    }

    /// [`ConsoleReads::map`].
    async fn map(&self, orchestration: &str, version: u32) -> StoreResult<MapData> {
        let what = "console map";
        let by_step = self
            .fetch(
                what,
                // Dehydrated and suspended from the partial index, running along
                // instances_by_status.
                "SELECT step, status, COUNT(*) AS n FROM instances \
                 WHERE orchestration = $1 AND version = $2 \
                 AND status IN ('dehydrated', 'suspended') AND status <> 'running' \
                 GROUP BY step, status \
                 UNION ALL SELECT step, status, COUNT(*) AS n FROM instances \
                 WHERE status = 'running' AND orchestration = $1 AND version = $2 \
                 GROUP BY step, status",
                vec![Param::Text(orchestration.to_owned()), Param::Count(version)],
            )
            .await?;
        let by_step = readable(
            by_step.iter().map(|r| {
                Ok((
                    Self::col_text(r, "step")?,
                    Self::col_word(r, "status")?,
                    Self::col_i64(r, "n")?,
                ))
            }),
            what,
        );
        // The points of the latest changed instances (of every definition: the list's merge
        // per status), those of this definition each with the step of the point before it (none
        // for an instance's first point): the transitions seen recently.
        let (recent, _) =
            instance_list::<Self>(&InstanceFilter::default(), None, u64::from(MAP_SAMPLE));
        let sql = format!(
            "SELECT COALESCE(p.step, '{MAP_START}') AS from_step, h.step AS to_step, h.status AS status, COUNT(*) AS n \
             FROM ({recent}) i \
             JOIN history h ON h.instance_id = i.id \
             LEFT JOIN history p ON p.instance_id = h.instance_id AND p.seq = h.seq - 1 \
             WHERE i.orchestration = $1 AND i.version = $2 \
             GROUP BY p.step, h.step, h.status"
        );
        let rows = self
            .fetch(
                what,
                &sql,
                vec![Param::Text(orchestration.to_owned()), Param::Count(version)],
            )
            .await?;
        let mut transitions: std::collections::BTreeMap<(String, String), i64> = Default::default();
        for row in readable(
            rows.iter().map(|r| {
                Ok((
                    Self::col_text(r, "from_step")?,
                    Self::col_text(r, "to_step")?,
                    Self::col_text(r, "status")?,
                    Self::col_i64(r, "n")?,
                ))
            }),
            what,
        ) {
            let (from, to, status, n) = row;
            if from != to {
                *transitions.entry((from, to.clone())).or_default() += n;
            }
            if matches!(status.as_str(), "completed" | "failed" | "terminated") && to != status {
                *transitions.entry((to, status)).or_default() += n;
            }
        }
        Ok(MapData {
            by_step,
            transitions: transitions
                .into_iter()
                .map(|((from, to), n)| (from, to, n))
                .collect(),
        })
    }

    /// [`ConsoleReads::activations`].
    async fn activations(&self) -> StoreResult<Vec<(String, u32)>> {
        self.rows(
            "console activations",
            "SELECT DISTINCT orchestration, version FROM subscriptions \
             WHERE instance_id IS NULL AND orchestration IS NOT NULL AND version IS NOT NULL \
             ORDER BY orchestration, version",
            vec![],
            |r| {
                Ok((
                    Self::col_text(r, "orchestration")?,
                    Self::col_u32(r, "subscriptions", "version")?,
                ))
            },
        )
        .await
    }

    /// [`ConsoleReads::messages`].
    async fn messages(&self, status: &str) -> StoreResult<Vec<MessageRow>> {
        // Each order is the one its partial index keeps.
        let order = if status == "unrouted" {
            "published_at DESC"
        } else {
            "seq DESC"
        };
        self.rows(
            "console messages",
            &format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE status = $1 \
                 ORDER BY {order} LIMIT {LIST_LIMIT}"
            ),
            vec![Param::Text(status.to_owned())],
            message_row::<Self>,
        )
        .await
    }

    /// [`ConsoleReads::held_sends`].
    async fn held_sends(&self) -> StoreResult<Vec<SendRow>> {
        self.rows(
            "console held sends",
            &format!(
                "SELECT {SEND_COLUMNS} FROM outbox WHERE status = 'held' \
                 ORDER BY port, seq LIMIT {LIST_LIMIT}"
            ),
            vec![],
            send_row::<Self>,
        )
        .await
    }

    /// [`ConsoleReads::hosts`].
    async fn hosts(&self) -> StoreResult<Vec<HostRow>> {
        self.rows(
                "console hosts",
                &format!(
                    "SELECT h.id, h.name, CAST(h.pid AS BIGINT) AS pid, h.started_at, h.heartbeat_at, \
                     h.stopped_at, (SELECT COUNT(*) FROM instances i WHERE i.owner = h.id) AS owned \
                     FROM hosts h ORDER BY h.heartbeat_at DESC LIMIT {LIST_LIMIT}"
                ),
                vec![],
            |r| {
                Ok(HostRow {
                    id: Self::col_text(r, "id")?,
                    name: Self::col_text(r, "name")?,
                    pid: Self::col_i64(r, "pid")?,
                    started_at: Self::col_time(r, "started_at")?,
                    heartbeat_at: Self::col_time(r, "heartbeat_at")?,
                    stopped_at: Self::col_time_opt(r, "stopped_at")?,
                    owned: Self::col_i64(r, "owned")?,
                })
            },
        )
        .await
    }
}

/// The columns of a [`MessageRow`].
const MESSAGE_COLUMNS: &str =
    "id, message_type, status, instance_id, reason, properties, published_at, consumed_at";

fn message_row<B: Backend>(row: &RowOf<B>) -> StoreResult<MessageRow> {
    Ok(MessageRow {
        id: B::col_text(row, "id")?,
        message_type: B::col_text(row, "message_type")?,
        status: B::col_text(row, "status")?,
        instance_id: B::col_uuid_opt(row, "instance_id")?,
        reason: B::col_text_opt(row, "reason")?,
        properties: B::col_text(row, "properties")?,
        published_at: B::col_time(row, "published_at")?,
        consumed_at: B::col_time_opt(row, "consumed_at")?,
    })
}

/// The columns of a [`SendRow`].
const SEND_COLUMNS: &str = "id, instance_id, port, message_type, status, \
     CAST(attempts AS BIGINT) AS attempts, last_error, delivered_at";

fn send_row<B: Backend>(row: &RowOf<B>) -> StoreResult<SendRow> {
    Ok(SendRow {
        id: B::col_text(row, "id")?,
        instance_id: B::col_uuid(row, "instance_id")?,
        port: B::col_text(row, "port")?,
        message_type: B::col_text(row, "message_type")?,
        status: B::col_text(row, "status")?,
        attempts: B::col_i64(row, "attempts")?,
        last_error: B::col_text_opt(row, "last_error")?,
        delivered_at: B::col_time_opt(row, "delivered_at")?,
    })
}

/// `impl ConsoleReads for $store`, every query handed to [`ConsoleRoom`].
macro_rules! console_reads {
    ($store:ty) => {
        impl ConsoleRoom for $store {}

        #[async_trait::async_trait]
        impl ConsoleReads for $store {
            async fn overview(&self, now: DateTime<Utc>) -> StoreResult<Overview> {
                ConsoleRoom::overview(self, now).await
            }
            async fn definition_counts(&self) -> StoreResult<Vec<DefinitionCount>> {
                ConsoleRoom::definition_counts(self).await
            }
            async fn instances(
                &self,
                filter: &InstanceFilter,
                after: Option<Cursor>,
                limit: u32,
            ) -> StoreResult<InstancePage> {
                ConsoleRoom::instances(self, filter, after, limit).await
            }
            async fn instance_waits(&self, id: Uuid) -> StoreResult<InstanceWaits> {
                ConsoleRoom::instance_waits(self, id).await
            }
            async fn map(&self, orchestration: &str, version: u32) -> StoreResult<MapData> {
                ConsoleRoom::map(self, orchestration, version).await
            }
            async fn activations(&self) -> StoreResult<Vec<(String, u32)>> {
                ConsoleRoom::activations(self).await
            }
            async fn messages(&self, status: &str) -> StoreResult<Vec<MessageRow>> {
                ConsoleRoom::messages(self, status).await
            }
            async fn held_sends(&self) -> StoreResult<Vec<SendRow>> {
                ConsoleRoom::held_sends(self).await
            }
            async fn hosts(&self) -> StoreResult<Vec<HostRow>> {
                ConsoleRoom::hosts(self).await
            }
        }
    };
}

console_reads!(SqliteStore);
console_reads!(PostgresStore);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_filter_matches_its_text_anywhere_with_wildcards_escaped() {
        assert_eq!(contains_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
    }

    #[test]
    fn a_cursor_continues_after_the_last_row_in_the_same_order() {
        let filter = InstanceFilter {
            status: Some(InstanceStatus::Suspended),
            ..InstanceFilter::default()
        };
        let cursor = Cursor {
            updated_at: Utc::now(),
            id: Uuid::nil(),
        };
        let (sql, params) = instance_list::<SqliteStore>(&filter, Some(cursor), 51);
        assert!(
            sql.contains(
                "WHERE 1 AND status = 'suspended' AND status <> 'running' \
                 AND updated_at <= $1 AND (updated_at < $1 OR id < $2) \
                 ORDER BY updated_at DESC, id DESC LIMIT 51"
            ),
            "{sql}"
        );
        assert_eq!(params.len(), 2);
    }
}
