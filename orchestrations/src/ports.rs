//! The sample send ports: stand-ins for a payment provider, a warehouse, a billing system and a
//! notification service.
//!
//! `CAIRN_SAMPLE_LATENCY_MS`, when set, makes every delivery take a random time up to that many
//! milliseconds, like a real remote system (the shutdown test uses it to have work in flight).
//!
//! Each port writes one line per delivery (`port<TAB>message id`) to the file named by
//! `CAIRN_PORT_LEDGER`, when set: the ports' own record, which the crash tests read to check that
//! every committed send was delivered under one id and no uncommitted one was.

use std::collections::BTreeMap;
use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use cairn::{
    Client, Delivering, FilePort, OutboundMessage, PortError, Ports, RetryPolicy, SendPort,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// Appends delivered message ids to a file.
#[derive(Debug, Clone)]
pub struct Ledger(Option<PathBuf>);

impl Ledger {
    /// The ledger named by `CAIRN_PORT_LEDGER`, or none.
    pub fn from_env() -> Self {
        Self(std::env::var_os("CAIRN_PORT_LEDGER").map(PathBuf::from))
    }

    /// Records one delivery before the port reports success (after the simulated latency).
    pub async fn record(&self, msg: &OutboundMessage) -> Result<(), PortError> {
        self.record_with(msg, "").await
    }

    /// Records one delivery with more tab-separated columns after the message type.
    pub async fn record_with(&self, msg: &OutboundMessage, extra: &str) -> Result<(), PortError> {
        simulated_latency().await;
        let Some(path) = &self.0 else { return Ok(()) };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|e| PortError::transient(format!("ledger {}: {e}", path.display())))?;
        let line = if extra.is_empty() {
            format!("{}\t{}\t{}\n", msg.port, msg.id, msg.message_type)
        } else {
            format!("{}\t{}\t{}\t{extra}\n", msg.port, msg.id, msg.message_type)
        };
        file.write_all(line.as_bytes())
            .await
            .map_err(|e| PortError::transient(format!("ledger {}: {e}", path.display())))?;
        Ok(())
    }
}

async fn simulated_latency() {
    let max: u64 = std::env::var("CAIRN_SAMPLE_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if max > 0 {
        let ms = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=max);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// Whether this call fails, at the rate `CAIRN_SAMPLE_FAILURE_PERCENT` sets (default 0): the
/// booking services' simulated outages, which the send ports retry under the same message id.
fn flaky() -> bool {
    let percent: u32 = std::env::var("CAIRN_SAMPLE_FAILURE_PERCENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    percent > 0 && rand::Rng::gen_range(&mut rand::thread_rng(), 0..100) < percent
}

/// Whether an order's shipment is never confirmed (one in five), so the sample shows its timeout.
pub fn warehouse_loses(order_id: &str) -> bool {
    order_id.bytes().map(u32::from).sum::<u32>() % 5 == 0
}

/// A booking service (`flights`, `hotels`, `cars`): `*.book` answers with a reference derived
/// from the request's id (so a redelivered request books nothing twice), or refuses when the trip
/// says the service is sold out; `*.cancel` is one-way. The ledger line carries the message type,
/// the trip and the reference: the record the saga tests count bookings and cancellations from.
fn booking_service(
    ports: Ports,
    port: &'static str,
    service: &'static str,
    ledger: Ledger,
) -> Ports {
    ports.function(port, move |msg: OutboundMessage| {
        let ledger = ledger.clone();
        async move {
            if flaky() {
                return Err(PortError::transient(format!(
                    "{service} service unavailable (simulated)"
                )));
            }
            let trip = msg.body["trip_id"].as_str().unwrap_or_default().to_owned();
            if msg.message_type.ends_with(".cancel") {
                let reference = msg.body["reference"].as_str().unwrap_or_default();
                ledger
                    .record_with(&msg, &format!("{trip}\t{reference}"))
                    .await?;
                return Ok(None);
            }
            if msg.body["sold_out"].as_str() == Some(service) {
                ledger.record_with(&msg, &format!("{trip}\t-")).await?;
                return Ok(Some(
                    json!({ "booked": false, "reason": format!("no {service} left") }),
                ));
            }
            let reference = format!("{service}-{}", msg.id);
            ledger
                .record_with(&msg, &format!("{trip}\t{reference}"))
                .await?;
            Ok(Some(json!({ "booked": true, "reference": reference })))
        }
    })
}

/// The audit trail's port: an ordered file port writing `<dir>/<message id>.json` (the folder
/// named by `CAIRN_AUDIT_DIR`, `cairn-audit` by default), which also records each delivery in
/// the ledger. For the crash tests, `CAIRN_AUDIT_FAIL_N=N` makes the entry numbered N fail until
/// the file named by `CAIRN_AUDIT_RECOVERED` exists (a target that is down, then fixed).
struct AuditPort {
    file: FilePort,
    ledger: Ledger,
}

impl SendPort for AuditPort {
    fn deliver(&self, message: OutboundMessage) -> Delivering {
        let file = self.file.clone();
        let ledger = self.ledger.clone();
        Box::pin(async move {
            let failing = std::env::var("CAIRN_AUDIT_FAIL_N")
                .ok()
                .and_then(|n| n.parse::<i64>().ok());
            let recovered = std::env::var_os("CAIRN_AUDIT_RECOVERED")
                .is_some_and(|path| std::path::Path::new(&path).exists());
            if failing.is_some() && message.body["n"].as_i64() == failing && !recovered {
                return Err(PortError::transient(
                    "the audit store refuses this entry (simulated)",
                ));
            }
            let reply = file.deliver(message.clone()).await?;
            ledger.record(&message).await?;
            Ok(reply)
        })
    }
}

/// The sample ports. The warehouse publishes `shipment.confirmed` back through `client`.
pub fn sample_ports(client: Client, ledger: Ledger) -> Ports {
    let l1 = ledger.clone();
    let l2 = ledger.clone();
    let l3 = ledger.clone();
    let ports = booking_service(Ports::new(), "flights", "flight", ledger.clone());
    let ports = booking_service(ports, "hotels", "hotel", ledger.clone());
    let ports = booking_service(ports, "cars", "car", ledger.clone());
    let audit_dir =
        std::env::var_os("CAIRN_AUDIT_DIR").map_or_else(|| "cairn-audit".into(), PathBuf::from);
    let ports = ports
        .adapter(
            "audit",
            Arc::new(AuditPort {
                file: FilePort::new(audit_dir),
                ledger: ledger.clone(),
            }),
        )
        .ordered("audit")
        .retry(
            "audit",
            RetryPolicy {
                max_attempts: 3,
                base: Duration::from_millis(50),
                factor: 2.0,
                cap: Duration::from_secs(5),
            },
        );
    ports
        .function("payment", move |msg: OutboundMessage| {
            let ledger = l1.clone();
            async move {
                ledger.record(&msg).await?;
                let amount = msg.body["amount"].as_f64().unwrap_or(0.0);
                let order = msg.body["order_id"].as_str().unwrap_or_default().to_owned();
                Ok(Some(
                    json!({ "authorised": amount < 1000.0, "code": format!("AUTH-{order}") }),
                ))
            }
        })
        .function("warehouse", move |msg: OutboundMessage| {
            let ledger = l2.clone();
            let client = client.clone();
            async move {
                ledger.record(&msg).await?;
                let order = msg.body["order_id"].as_str().unwrap_or_default().to_owned();
                if !warehouse_loses(&order) {
                    client
                        .publish(
                            "shipment.confirmed",
                            json!({ "order_id": order, "tracking": format!("TRACK-{order}") }),
                            Some(format!("shipment-{order}")),
                            BTreeMap::new(),
                        )
                        .await
                        .map_err(|e| PortError::transient(e.to_string()))?;
                }
                Ok(None)
            }
        })
        .function("billing", move |msg: OutboundMessage| {
            let ledger = l3.clone();
            async move {
                ledger.record(&msg).await?;
                let amount = msg.body["amount"].as_f64().unwrap_or(0.0);
                Ok(Some(json!({ "billed": amount <= 500.0 })))
            }
        })
        .function("notifications", move |msg: OutboundMessage| {
            let ledger = ledger.clone();
            async move {
                ledger.record(&msg).await?;
                Ok(None)
            }
        })
}
