//! The file port: writes each message to a folder, atomically, named by its id.
//!
//! The message is written to a hidden temporary file in the same folder, flushed to disk, and
//! renamed to `<message id>.json`: a reader of the folder sees a whole file or none. A redelivery
//! writes the same name again with the same content, so the folder is the port's deduplicated
//! record.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

use super::{Delivering, OutboundMessage, PortError, SendPort};

/// Writes messages to a folder; see the module docs.
#[derive(Debug, Clone)]
pub struct FilePort {
    dir: PathBuf,
}

impl FilePort {
    /// A port writing into `dir` (created when missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The file a message is written to.
    pub fn path_of(&self, message_id: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_name(message_id)))
    }
}

/// A message id made safe as a file name.
fn file_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl SendPort for FilePort {
    fn deliver(&self, message: OutboundMessage) -> Delivering {
        let dir = self.dir.clone();
        let target = self.path_of(&message.id);
        Box::pin(async move {
            write_atomically(&dir, &target, &message)
                .await
                .map_err(|e| PortError::transient(format!("file port {}: {e}", dir.display())))?;
            Ok(None)
        })
    }
}

async fn write_atomically(
    dir: &Path,
    target: &Path,
    message: &OutboundMessage,
) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let content = serde_json::to_vec_pretty(&serde_json::json!({
        "id": message.id,
        "instance_id": message.instance_id,
        "port": message.port,
        "message_type": message.message_type,
        "body": message.body,
    }))
    .map_err(std::io::Error::other)?;
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        file_name(&message.id),
        uuid::Uuid::new_v4().simple()
    ));
    let mut file = tokio::fs::File::create(&temp).await?;
    file.write_all(&content).await?;
    file.sync_all().await?;
    drop(file);
    if let Err(e) = tokio::fs::rename(&temp, target).await {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(e);
    }
    Ok(())
}
