//! The EC2 peer: a real `moto_server` (PyPI `moto[server]`) that each test
//! starts on a free loopback port, an EC2 client to change the world out of
//! band, and what moto still holds for a stack. A small loopback proxy between
//! `stack` and moto counts requests, slows them down, or SIGKILLs `stack` at
//! an exact request, so interruptions are repeatable.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::Filter;

use super::{free_port, read_request, runtime};

/// A real moto server on loopback, stopped on drop.
pub(crate) struct Moto {
    child: Child,
    pub(crate) port: u16,
}

impl Moto {
    pub(crate) fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "moto_server is not installed: run `pip install 'moto[server]'` (.ci/run does)",
            );
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start on port {port}"
            );
            thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy does to the requests it passes on.
#[derive(Default)]
pub(crate) struct ProxyRules {
    /// SIGKILL this process when the n-th request's answer arrives, before
    /// passing it on (the world changed; `stack` never learns it).
    pub(crate) kill_at: Option<usize>,
    pub(crate) victim: Option<Arc<Mutex<Child>>>,
    pub(crate) delay: Duration,
}

/// A loopback HTTP proxy in front of moto.
pub(crate) struct Proxy {
    port: u16,
    requests: Arc<AtomicUsize>,
    pub(crate) rules: Arc<Mutex<ProxyRules>>,
}

/// Forces `Connection: close` so each request has its own connection.
fn with_close(request: &[u8]) -> Vec<u8> {
    let end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&request[..end]);
    let mut out: Vec<u8> = head
        .lines()
        .filter(|l| !l.to_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n")
        .into_bytes();
    out.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    out.extend_from_slice(&request[end + 4..]);
    out
}

impl Proxy {
    pub(crate) fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let rules = Arc::new(Mutex::new(ProxyRules::default()));
        let (count, shared) = (requests.clone(), rules.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let (count, rules) = (count.clone(), shared.clone());
                thread::spawn(move || {
                    let Some(request) = read_request(&mut client) else {
                        return;
                    };
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let delay = rules.lock().unwrap().delay;
                    thread::sleep(delay);
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        return;
                    };
                    if server.write_all(&with_close(&request)).is_err() {
                        return;
                    }
                    let mut answer = Vec::new();
                    let _ = server.read_to_end(&mut answer);
                    {
                        let rules = rules.lock().unwrap();
                        if rules.kill_at == Some(n) {
                            if let Some(victim) = &rules.victim {
                                let _ = victim.lock().unwrap().kill();
                            }
                            let _ = client.shutdown(Shutdown::Both);
                            return;
                        }
                    }
                    let _ = client.write_all(&answer);
                });
            }
        });
        Proxy {
            port,
            requests,
            rules,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

pub(crate) fn ec2(endpoint: &str) -> aws_sdk_ec2::Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// Everything moto still holds that is tagged with the stack.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Tagged {
    pub(crate) instances: Vec<String>,
    groups: usize,
    key_pairs: usize,
}

pub(crate) fn tagged(endpoint: &str, stack: &str) -> Tagged {
    let client = ec2(endpoint);
    let by_tag = || Filter::builder().name("tag:stack").values(stack).build();
    runtime().block_on(async {
        let reservations = client
            .describe_instances()
            .filters(by_tag())
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(
                        ["pending", "running", "stopping", "stopped"]
                            .map(String::from)
                            .to_vec(),
                    ))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let mut instances: Vec<String> = reservations
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| {
                i.tags()
                    .iter()
                    .filter(|t| t.key() == Some("stack:address"))
                    .map(|t| t.value().unwrap().to_string())
            })
            .collect();
        instances.sort();
        let groups = client
            .describe_security_groups()
            .filters(by_tag())
            .send()
            .await
            .unwrap()
            .security_groups()
            .len();
        let key_pairs = client
            .describe_key_pairs()
            .filters(by_tag())
            .send()
            .await
            .unwrap()
            .key_pairs()
            .len();
        Tagged {
            instances,
            groups,
            key_pairs,
        }
    })
}

impl Tagged {
    /// What a `down` must leave.
    pub(crate) fn nothing() -> Tagged {
        Tagged {
            instances: vec![],
            groups: 0,
            key_pairs: 0,
        }
    }

    /// The key pair, the group and the three nodes of `stack_yaml(_, 2)`.
    pub(crate) fn three_nodes() -> Tagged {
        Tagged {
            instances: [
                "ec2.instance.control[0]",
                "ec2.instance.worker[0]",
                "ec2.instance.worker[1]",
            ]
            .map(String::from)
            .to_vec(),
            groups: 1,
            key_pairs: 1,
        }
    }
}
