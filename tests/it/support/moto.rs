//! The EC2 peer: a real `moto_server` (PyPI `moto[server]`) that each test
//! starts on a free loopback port, an EC2 client to change the world out of
//! band, and what moto still holds for a stack. A small loopback proxy between
//! `stack` and moto counts requests and their EC2 actions, slows them down,
//! SIGKILLs `stack` at an exact request, or answers a seeded share of them
//! with EC2's transient errors, so interruptions and faults are repeatable.

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
    /// The same at the n-th answer to one EC2 action (counted over the
    /// proxy's life, see [`Proxy::answered`]).
    pub(crate) kill_at_action: Option<(&'static str, usize)>,
    pub(crate) victim: Option<Arc<Mutex<Child>>>,
    pub(crate) delay: Duration,
    /// Answer some requests with an EC2 error in moto's place.
    pub(crate) faults: Option<Faults>,
    /// Pass the next request of each of these actions on to moto, then
    /// answer 500 InternalError: the call worked, its answer was lost.
    pub(crate) lose_answer: Vec<&'static str>,
}

/// About `percent` of the requests, picked from the request's number and
/// `seed`, are answered with one of [`FAULTS`] without reaching moto.
#[derive(Clone, Copy)]
pub(crate) struct Faults {
    pub(crate) seed: u64,
    pub(crate) percent: u64,
}

/// Transient errors as EC2 answers them: status, code, message.
const FAULTS: [(u16, &str, &str); 4] = [
    (500, "InternalError", "An internal error has occurred."),
    (
        503,
        "Unavailable",
        "The server is overloaded and cannot handle the request.",
    ),
    (400, "RequestLimitExceeded", "Request limit exceeded."),
    (400, "Throttling", "Rate exceeded."),
];

/// SplitMix64: a well-mixed number from a seed and a counter.
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Faults {
    /// The error answer for request `n`, if it is one to fail.
    fn answer(&self, n: usize) -> Option<Vec<u8>> {
        let roll = mix(self.seed, n as u64);
        if roll % 100 >= self.percent {
            return None;
        }
        Some(error_answer(
            FAULTS[((roll >> 32) % FAULTS.len() as u64) as usize],
            n,
        ))
    }
}

/// An EC2 error answer with Connection: close.
fn error_answer((status, code, message): (u16, &str, &str), n: usize) -> Vec<u8> {
    let reason = match status {
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>fault-{n}</RequestID></Response>"
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The EC2 action a request asks for (`Action=RunInstances&…` in its form body).
fn action_of(request: &[u8]) -> String {
    let text = String::from_utf8_lossy(request);
    text.split(['&', '\n'])
        .find_map(|part| part.trim().strip_prefix("Action="))
        .unwrap_or("?")
        .to_string()
}

/// What the proxy saw, shared with its threads.
#[derive(Default)]
struct Seen {
    /// The action of every request, in the order they came.
    actions: Vec<String>,
    /// Answers from moto passed on (or withheld by a kill), by action.
    answered: std::collections::HashMap<String, usize>,
    /// Requests answered with an injected error.
    faults: usize,
    /// Requests read and not yet answered (or dropped).
    in_flight: usize,
}

/// Counts a request as in flight while it lives.
struct InFlight(Arc<Mutex<Seen>>);

impl InFlight {
    fn new(seen: &Arc<Mutex<Seen>>) -> InFlight {
        seen.lock().unwrap().in_flight += 1;
        InFlight(seen.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().unwrap().in_flight -= 1;
    }
}

/// A loopback HTTP proxy in front of moto.
pub(crate) struct Proxy {
    port: u16,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Seen>>,
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
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (count, shared, witness) = (requests.clone(), rules.clone(), seen.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let (count, rules, seen) = (count.clone(), shared.clone(), witness.clone());
                thread::spawn(move || {
                    let Some(request) = read_request(&mut client) else {
                        return;
                    };
                    let _in_flight = InFlight::new(&seen);
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let action = action_of(&request);
                    seen.lock().unwrap().actions.push(action.clone());
                    let (delay, faults) = {
                        let rules = rules.lock().unwrap();
                        (rules.delay, rules.faults)
                    };
                    thread::sleep(delay);
                    if let Some(fault) = faults.and_then(|f| f.answer(n)) {
                        seen.lock().unwrap().faults += 1;
                        let _ = client.write_all(&fault);
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        return;
                    };
                    if server.write_all(&with_close(&request)).is_err() {
                        return;
                    }
                    let mut answer = Vec::new();
                    let _ = server.read_to_end(&mut answer);
                    let nth_of_action = {
                        let mut seen = seen.lock().unwrap();
                        let answered = seen.answered.entry(action.clone()).or_default();
                        *answered += 1;
                        *answered
                    };
                    {
                        let mut rules = rules.lock().unwrap();
                        if let Some(at) = rules.lose_answer.iter().position(|a| *a == action) {
                            rules.lose_answer.remove(at);
                            seen.lock().unwrap().faults += 1;
                            let _ = client.write_all(&error_answer(FAULTS[0], n));
                            return;
                        }
                        let kill = rules.kill_at == Some(n)
                            || rules.kill_at_action.is_some_and(|(wanted, at)| {
                                wanted == action && at == nth_of_action
                            });
                        if kill {
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
            seen,
            rules,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The action of every request so far, in order.
    pub(crate) fn actions(&self) -> Vec<String> {
        self.seen.lock().unwrap().actions.clone()
    }

    /// How many of moto's answers to `action` arrived so far.
    pub(crate) fn answered(&self, action: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .answered
            .get(action)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until every request that reached the proxy is done with (after
    /// a kill, those already passed on still change moto).
    pub(crate) fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.seen.lock().unwrap().in_flight > 0 {
            assert!(Instant::now() < deadline, "requests still in flight");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many requests were answered with an injected error so far.
    pub(crate) fn faults(&self) -> usize {
        self.seen.lock().unwrap().faults
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

/// The live instances tagged with the stack, by their `stack:address` tag.
pub(crate) fn instance_ids(endpoint: &str, stack: &str) -> Vec<(String, String)> {
    let client = ec2(endpoint);
    runtime().block_on(async {
        let reservations = client
            .describe_instances()
            .filters(Filter::builder().name("tag:stack").values(stack).build())
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let mut ids: Vec<(String, String)> = reservations
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| {
                let address = i
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some("stack:address"))?
                    .value()?;
                Some((address.to_string(), i.instance_id()?.to_string()))
            })
            .collect();
        ids.sort();
        ids
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

    /// The key pair, the group and the nodes of `stack_yaml(_, workers)`.
    pub(crate) fn nodes(workers: u32) -> Tagged {
        let mut instances = vec!["ec2.instance.control[0]".to_string()];
        instances.extend((0..workers).map(|i| format!("ec2.instance.worker[{i}]")));
        instances.sort();
        Tagged {
            instances,
            groups: 1,
            key_pairs: 1,
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
