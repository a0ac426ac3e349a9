//! A throwaway PostgreSQL cluster for the tests, from the system's server
//! binaries (no Docker, no download): `initdb` into a temp dir under /tmp
//! (as the `postgres` user through `runuser` when we are root: initdb
//! refuses root), started on a Unix socket only (no TCP port), with
//! `fsync=off` (the tests measure behaviour, not durability). One cluster
//! per test binary, started at its first use and stopped at exit; each
//! test gets a database of its own.
//!
//! Where no PostgreSQL binaries exist the PostgreSQL tests say so loudly
//! and return; under `CI=true` they fail instead.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Cluster {
    /// Holds `data/`, the server log and the socket.
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// Where `initdb` and `pg_ctl` are: `EASEL_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin`, else `pg_config --bindir`.
fn find_bin() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("EASEL_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    bin.join("initdb").exists().then_some(bin)
}

fn run(c: &Cluster, program: &str, args: &[&str]) -> Result<(), String> {
    let exe = c.bin.join(program);
    let mut cmd = if c.as_postgres {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(&exe);
        cmd
    } else {
        Command::new(&exe)
    };
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn start() -> Result<Cluster, String> {
    let c = start_with(false)?;
    // SAFETY: registering a plain extern "C" function; it runs once at exit.
    unsafe {
        libc::atexit(stop_at_exit);
    }
    Ok(c)
}

/// A cluster of one test's own (`fsync=off`), for what would disturb the
/// binary's other tests — restarting the server; stopped and removed when
/// dropped. None (after saying so loudly) where no PostgreSQL can be
/// started, a failure under `CI=true`.
pub fn private() -> Option<Private> {
    match start_with(false) {
        Ok(c) => Some(Private(c)),
        Err(why) => {
            skipped(&why);
            None
        }
    }
}

/// See [`private`].
pub struct Private(pub Cluster);

impl Drop for Private {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A cluster of its own, durable (`fsync=on`, `synchronous_commit=on`,
/// the defaults) for benchmarks, which may not measure without them;
/// [`Cluster::stop`] stops it.
pub fn start_durable() -> Result<Cluster, String> {
    start_with(true)
}

fn start_with(durable: bool) -> Result<Cluster, String> {
    let bin = find_bin().ok_or("no PostgreSQL server binaries (initdb) found")?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = tempfile::Builder::new()
        .prefix("easel-pg.")
        .tempdir_in("/tmp")
        .map_err(|e| e.to_string())?
        .keep();
    if root {
        let owned = Command::new("chown")
            .arg("postgres:")
            .arg(&dir)
            .status()
            .map_err(|e| e.to_string())?;
        if !owned.success() {
            return Err("chown postgres: failed (is there a postgres user?)".into());
        }
    }
    let c = Cluster {
        dir,
        bin,
        as_postgres: root,
    };
    let data = c.dir.join("data");
    let data = data.to_str().ok_or("temp dir is not UTF-8")?;
    run(
        &c,
        "initdb",
        &[
            "-D",
            data,
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
    )?;
    let log = c.dir.join("server.log");
    let options = format!(
        "-c listen_addresses='' -c unix_socket_directories='{}' -c max_connections=300{}",
        c.dir.display(),
        if durable {
            ""
        } else {
            " -c fsync=off -c full_page_writes=off"
        }
    );
    run(
        &c,
        "pg_ctl",
        &[
            "-D",
            data,
            "-l",
            log.to_str().ok_or("temp dir is not UTF-8")?,
            "-w",
            "-o",
            &options,
            "start",
        ],
    )?;
    Ok(c)
}

extern "C" fn stop_at_exit() {
    if let Some(Ok(c)) = CLUSTER.get() {
        c.stop();
    }
}

/// The test binary's cluster; None (after saying so loudly) where no
/// PostgreSQL can be started, a failure under `CI=true`.
pub fn cluster() -> Option<&'static Cluster> {
    match CLUSTER.get_or_init(start) {
        Ok(c) => Some(c),
        Err(why) => {
            skipped(why);
            None
        }
    }
}

/// Says loudly that the PostgreSQL tests are skipped, and why; under
/// `CI=true` fails instead.
fn skipped(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: the PostgreSQL tests must run, but: {why}"
    );
    eprintln!(
        "\n*** PostgreSQL tests SKIPPED: {why}. Install PostgreSQL's server (Debian: postgresql) or set EASEL_PG_BIN. ***\n"
    );
}

impl Cluster {
    /// Restarts the server (`pg_ctl restart -m fast`: every session
    /// ended, a shutdown checkpoint, started again with the same options).
    ///
    /// # Panics
    /// When it does not come back.
    pub fn restart(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        run(
            self,
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-m",
                "fast",
                "-w",
                "restart",
            ],
        )
        .expect("restart the test cluster");
    }

    /// Stops the server and removes its folder.
    pub fn stop(&self) {
        let data = self.dir.join("data");
        let _ = run(
            self,
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The URL of database `db` over the cluster's Unix socket.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@localhost/{db}?host={}",
            self.dir.display()
        )
    }

    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// A new, empty database for one test; its URL.
    pub async fn fresh_database(&self) -> String {
        let n = DATABASES.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}_{n}", std::process::id());
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to the test cluster");
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        drop(client);
        let _ = driver.await;
        self.url(&name)
    }
}

/// A fresh database of the test binary's cluster, or None (skipped loudly).
pub async fn database() -> Option<String> {
    match cluster() {
        Some(c) => Some(c.fresh_database().await),
        None => None,
    }
}
