//! A minimal QMP client: the JSON lines QEMU speaks on its control socket,
//! for reading a VM's status and asking it to power down.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("QMP socket {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("QMP socket {0} closed the connection")]
    Closed(String),
    #[error("QMP command {command} failed: {message}")]
    Command { command: String, message: String },
}

pub struct Qmp {
    socket: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation.
    pub async fn connect(socket: &Path) -> Result<Qmp, QmpError> {
        let name = socket.display().to_string();
        let stream = tokio::time::timeout(TIMEOUT, UnixStream::connect(socket))
            .await
            .map_err(|_| QmpError::Timeout(name.clone(), TIMEOUT))?
            .map_err(|e| QmpError::Io(name.clone(), e))?;
        let (reader, writer) = stream.into_split();
        let mut qmp = Qmp {
            socket: name,
            reader: BufReader::new(reader),
            writer,
        };
        qmp.line().await?;
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    async fn line(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let read = tokio::time::timeout(TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout(self.socket.clone(), TIMEOUT))?
            .map_err(|e| QmpError::Io(self.socket.clone(), e))?;
        if read == 0 {
            return Err(QmpError::Closed(self.socket.clone()));
        }
        Ok(serde_json::from_str(&line).unwrap_or(Value::Null))
    }

    /// Runs a command and returns its `return` value; events in between are skipped.
    pub async fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        let request = format!("{}\n", json!({ "execute": command }));
        self.writer
            .write_all(request.as_bytes())
            .await
            .map_err(|e| QmpError::Io(self.socket.clone(), e))?;
        loop {
            let answer = self.line().await?;
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = answer.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    message: error["desc"]
                        .as_str()
                        .unwrap_or("unknown error")
                        .to_string(),
                });
            }
        }
    }

    /// `running`, `paused`, `internal-error`, `shutdown`, …
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let status = self.execute("query-status").await?;
        Ok(status["status"].as_str().unwrap_or("unknown").to_string())
    }
}
