//! The peer of the state for teams: Debian's real PostgreSQL, one cluster
//! per test made by `initdb` in a temporary folder and started by `pg_ctl`
//! on a free loopback port, with password (SCRAM) authentication and TLS
//! from a CA the test makes. PostgreSQL refuses to run as root, so when the
//! tests run as root (CI) the cluster runs as `nobody` (`setpriv`), its
//! folder theirs; as any other user it runs as that user. The client tools
//! (`psql`, `pg_dump`) run as the test itself, over TCP with the password.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::free_port;

/// The superuser of every test cluster, and its password.
pub(crate) const USER: &str = "stack";
pub(crate) const PASSWORD: &str = "pg-test-password-4e1d";
/// The database the state lives in.
pub(crate) const DATABASE: &str = "state";

/// A running PostgreSQL cluster, stopped (and removed) on drop.
pub(crate) struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub(crate) port: u16,
    /// `nobody`, when the tests run as root.
    run_as: Option<&'static str>,
}

/// The newest `/usr/lib/postgresql/N/bin` that has `initdb`.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: `apt-get install postgresql` (.ci/run does)")
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .expect("no /usr/lib/postgresql/*/bin/initdb")
}

fn check(output: Output, what: &str) -> Output {
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn ca_params() -> rcgen::CertificateParams {
    let mut ca = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "state test CA");
    ca
}

/// A CA's certificate (PEM) that signed nothing.
pub(crate) fn new_ca() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    ca_params().self_signed(&key).unwrap().pem()
}

/// A CA and a certificate for 127.0.0.1 signed by it: (CA PEM, cert PEM, key PEM).
fn certificates() -> (String, String, String) {
    use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = leaf.signed_by(&key, &issuer).unwrap().pem();
    (ca_pem, cert, key.serialize_pem())
}

impl Postgres {
    pub(crate) fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        let run_as = root.then_some("nobody");
        let pg = Postgres {
            bin: bin_dir(),
            port: free_port(),
            run_as,
            dir,
        };
        let (ca, cert, key) = certificates();
        std::fs::write(pg.ca_path(), ca).unwrap();
        std::fs::write(pg.path().join("server.crt"), cert).unwrap();
        std::fs::write(pg.path().join("server.key"), key).unwrap();
        std::fs::set_permissions(
            pg.path().join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(pg.path().join("password"), PASSWORD).unwrap();
        if let Some(user) = run_as {
            check(
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{user}:"))
                    .arg(pg.path())
                    .output()
                    .unwrap(),
                "chown",
            );
        }
        let data = pg.data();
        let password_file = pg.path().join("password");
        check(
            pg.server_tool("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", USER, "--auth=scram-sha-256", "-N", "-E", "UTF8"])
                .args(["--locale=C", "--pwfile"])
                .arg(&password_file)
                .output()
                .unwrap(),
            "initdb",
        );
        pg.start_server();
        check(
            pg.psql_command("postgres")
                .args(["-c", &format!("CREATE DATABASE {DATABASE}")])
                .output()
                .unwrap(),
            "createdb",
        );
        pg
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    /// The CA that signed the server's certificate.
    pub(crate) fn ca_path(&self) -> PathBuf {
        self.path().join("ca.crt")
    }

    /// `initdb` or `pg_ctl`, as the cluster's user.
    fn server_tool(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        let mut command = match self.run_as {
            Some(user) => {
                let mut command = Command::new("setpriv");
                command
                    .args(["--reuid", user, "--regid", "nogroup", "--clear-groups"])
                    .arg(program);
                command
            }
            None => Command::new(program),
        };
        command
            .env("HOME", self.path())
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        command
    }

    fn start_server(&self) {
        let options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            self.port,
            self.path().display(),
            self.path().join("server.crt").display(),
            self.path().join("server.key").display(),
        );
        check(
            self.server_tool("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.path().join("server.log"))
                .args(["-w", "-t", "60", "-o", &options, "start"])
                .stdout(Stdio::null())
                .output()
                .unwrap(),
            "pg_ctl start",
        );
    }

    /// `pg_ctl stop -m fast`: every session is ended, as a server that
    /// goes down for maintenance ends them.
    pub(crate) fn stop(&self) {
        check(
            self.server_tool("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-m", "fast", "stop"])
                .output()
                .unwrap(),
            "pg_ctl stop",
        );
    }

    /// Starts the cluster again on the same port.
    pub(crate) fn restart(&self) {
        self.start_server();
    }

    /// The state URL without a password.
    pub(crate) fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Writes `HOME/.pgpass` (mode 0600) with the password for this cluster.
    pub(crate) fn write_pgpass(&self, home: &Path) {
        let path = home.join(".pgpass");
        std::fs::write(
            &path,
            format!("127.0.0.1:{}:{DATABASE}:{USER}:{PASSWORD}\n", self.port),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn psql_command(&self, database: &str) -> Command {
        let mut command = Command::new(self.bin.join("psql"));
        command
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-h",
                "127.0.0.1",
            ])
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database])
            .env("PGPASSWORD", PASSWORD)
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null());
        command
    }

    /// Runs `sql` in the state database; its rows, one a line, `|` between columns.
    pub(crate) fn psql(&self, sql: &str) -> String {
        let output = check(
            self.psql_command(DATABASE)
                .args(["-c", sql])
                .output()
                .unwrap(),
            sql,
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// `psql` that may fail (the tables may not be there yet).
    pub(crate) fn psql_try(&self, sql: &str) -> Option<String> {
        let output = self
            .psql_command(DATABASE)
            .args(["-c", sql])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Everything the state database holds, as `pg_dump` writes it.
    pub(crate) fn dump(&self) -> String {
        let output = check(
            Command::new(self.bin.join("pg_dump"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
                .arg(DATABASE)
                .env("PGPASSWORD", PASSWORD)
                .env("PGSSLMODE", "disable")
                .stdin(Stdio::null())
                .output()
                .unwrap(),
            "pg_dump",
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .server_tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
