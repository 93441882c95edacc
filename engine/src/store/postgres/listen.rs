//! Wake-ups: transactions that make work end with `NOTIFY` on [`WORK_CHANNEL`], and each host
//! `LISTEN`s for it.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{map_err, PostgresStore, Tx, WORK_CHANNEL};
use crate::store::StoreResult;

/// Tells listening hosts that there is work; delivered when the transaction commits.
pub(super) async fn notify(tx: &mut Tx) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(WORK_CHANNEL)
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("notify", e))?;
    Ok(())
}

/// [`MessageBox::listen`](crate::store::MessageBox::listen) on PostgreSQL.
pub(super) async fn listen(store: &PostgresStore, wake: Arc<Notify>, stop: CancellationToken) {
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let listening = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&store.pool).await?;
            listener.listen(WORK_CHANNEL).await?;
            tracing::debug!("listening for new work");
            // Work may have been committed before LISTEN took effect (at start, or while the
            // connection was down): look once.
            wake.notify_one();
            loop {
                // `None`: the connection was lost and is re-established on the next call;
                // wake anyway, as a notification may have been missed.
                let _ = listener.try_recv().await?;
                wake.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            result = listening => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, retry_in = ?backoff, "LISTEN connection lost; polling until it is back");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}
