//! The frame switch of a stack's private network: QEMU's `-netdev stream`
//! clients connect to one unix socket and exchange Ethernet frames, each
//! sent as a 4-byte big-endian length and the frame. The switch learns which
//! port each MAC address is behind and floods what it does not know, like a
//! hardware switch. It runs as `stack __switch SOCKET`, detached, one per stack.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

/// Frames a port may have queued before the switch drops new ones for it.
const QUEUE: usize = 512;
/// Larger frames than this are not Ethernet frames of a sane guest.
const MAX_FRAME: usize = 65_536;

#[derive(Default)]
struct Ports {
    next: u64,
    senders: HashMap<u64, mpsc::Sender<Arc<Vec<u8>>>>,
    macs: HashMap<[u8; 6], u64>,
}

impl Ports {
    /// Where a frame from `from` goes: the learnt port of its destination,
    /// or every other port.
    fn forward(&mut self, from: u64, frame: &Arc<Vec<u8>>) {
        let mut source = [0u8; 6];
        source.copy_from_slice(&frame[6..12]);
        if source[0] & 1 == 0 {
            self.macs.insert(source, from);
        }
        let mut destination = [0u8; 6];
        destination.copy_from_slice(&frame[0..6]);
        let targets: Vec<u64> = match self.macs.get(&destination) {
            Some(&port) if destination[0] & 1 == 0 => vec![port],
            _ => self.senders.keys().copied().collect(),
        };
        for port in targets.into_iter().filter(|&p| p != from) {
            if let Some(sender) = self.senders.get(&port) {
                let _ = sender.try_send(frame.clone());
            }
        }
    }

    fn remove(&mut self, port: u64) {
        self.senders.remove(&port);
        self.macs.retain(|_, p| *p != port);
    }
}

/// Serves the switch on `socket` until the process is stopped.
pub async fn serve(socket: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let ports = Arc::new(Mutex::new(Ports::default()));
    loop {
        let (stream, _) = listener.accept().await?;
        let (mut reader, mut writer) = stream.into_split();
        let (sender, mut queue) = mpsc::channel::<Arc<Vec<u8>>>(QUEUE);
        let id = {
            let mut ports = ports.lock().expect("switch lock");
            ports.next += 1;
            let id = ports.next;
            ports.senders.insert(id, sender);
            id
        };
        tokio::spawn(async move {
            while let Some(frame) = queue.recv().await {
                let length = (frame.len() as u32).to_be_bytes();
                if writer.write_all(&length).await.is_err()
                    || writer.write_all(&frame).await.is_err()
                {
                    break;
                }
            }
        });
        let ports = ports.clone();
        tokio::spawn(async move {
            loop {
                let mut length = [0u8; 4];
                if reader.read_exact(&mut length).await.is_err() {
                    break;
                }
                let length = u32::from_be_bytes(length) as usize;
                if !(14..=MAX_FRAME).contains(&length) {
                    break;
                }
                let mut frame = vec![0u8; length];
                if reader.read_exact(&mut frame).await.is_err() {
                    break;
                }
                ports
                    .lock()
                    .expect("switch lock")
                    .forward(id, &Arc::new(frame));
            }
            ports.lock().expect("switch lock").remove(id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixStream;

    fn frame(to: [u8; 6], from: [u8; 6]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&to);
        frame.extend_from_slice(&from);
        frame.extend_from_slice(&[0x08, 0x00, 1, 2, 3, 4]);
        frame
    }

    async fn send(stream: &mut UnixStream, frame: &[u8]) {
        stream
            .write_all(&(frame.len() as u32).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(frame).await.unwrap();
    }

    async fn receive(stream: &mut UnixStream) -> Vec<u8> {
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).await.unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
        stream.read_exact(&mut frame).await.unwrap();
        frame
    }

    #[tokio::test]
    async fn floods_unknown_destinations_then_forwards_to_the_learnt_port() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("switch.sock");
        let path = socket.clone();
        tokio::spawn(async move { serve(&path).await });
        while !socket.exists() {
            tokio::task::yield_now().await;
        }
        let (a, b, c) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]);
        let mut port_a = UnixStream::connect(&socket).await.unwrap();
        let mut port_b = UnixStream::connect(&socket).await.unwrap();
        let mut port_c = UnixStream::connect(&socket).await.unwrap();
        // Let the switch register all three ports.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let broadcast = frame([0xff; 6], a);
        send(&mut port_a, &broadcast).await;
        assert_eq!(receive(&mut port_b).await, broadcast);
        assert_eq!(receive(&mut port_c).await, broadcast);
        // b answers a: a was learnt, so only a gets it.
        let answer = frame(a, b);
        send(&mut port_b, &answer).await;
        assert_eq!(receive(&mut port_a).await, answer);
        let to_b = frame(b, c);
        send(&mut port_c, &to_b).await;
        assert_eq!(receive(&mut port_b).await, to_b);
        let nothing =
            tokio::time::timeout(std::time::Duration::from_millis(100), receive(&mut port_a)).await;
        assert!(nothing.is_err(), "a got a frame meant for b");
    }
}
