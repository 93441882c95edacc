//! The HTTP port: POSTs each message as JSON, with its id as the `Idempotency-Key` header.
//!
//! A 2xx answer is success (its JSON body, if any, is the reply to a request); a 5xx answer, a
//! 408 or 429, a timeout or a connection failure is retried; any other 4xx dead-letters the
//! message at once, since sending it again would get the same answer.

use std::time::Duration;

use super::{Delivering, OutboundMessage, PortError, SendPort};

/// The header that carries the message id.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// POSTs messages to a URL; see the module docs.
#[derive(Debug, Clone)]
pub struct HttpPort {
    url: String,
    client: reqwest::Client,
    timeout: Duration,
}

impl HttpPort {
    /// A port POSTing to `url`, with a 30 s timeout per attempt.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            client: reqwest::Client::new(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Sets the timeout of one attempt.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl SendPort for HttpPort {
    fn deliver(&self, message: OutboundMessage) -> Delivering {
        let request = self
            .client
            .post(&self.url)
            .timeout(self.timeout)
            .header(IDEMPOTENCY_HEADER, &message.id)
            .header("Content-Type", "application/json")
            .header("Cairn-Message-Type", &message.message_type)
            .header("Cairn-Instance-Id", message.instance_id.to_string())
            .body(message.body.to_string());
        let url = self.url.clone();
        Box::pin(async move {
            let response = request
                .send()
                .await
                .map_err(|e| PortError::transient(format!("POST {url}: {e}")))?;
            let status = response.status();
            let text = response.text().await.map_err(|e| {
                PortError::transient(format!("POST {url}: reading the answer: {e}"))
            })?;
            if status.is_success() {
                return Ok(serde_json::from_str(&text).ok());
            }
            let error = format!(
                "POST {url}: {status}: {}",
                text.chars().take(200).collect::<String>()
            );
            if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
                Err(PortError::transient(error))
            } else {
                Err(PortError::permanent(error))
            }
        })
    }
}
