//! Helpers for Capstan's end-to-end tests: real `capstan` processes on
//! temporary homes, driven through the command line exactly as a user would
//! (see `nodes/CLI.md`, the contract these tests check).
//!
//! # Layout
//!
//! - [`capstan_bin`]: the `capstan` binary under test (built once per test
//!   process with `cargo build -p capstan`, or `$CAPSTAN_BIN`).
//! - [`Node`]: one home directory and the daemon running on it; runs CLI
//!   commands with `--home` set, with a timeout on every wait, and kills its
//!   daemon when dropped (also when a test panics), so no process leaks.
//! - [`Run`]: the outcome of one command.
//! - small assertions: [`assert_cli_error`], [`is_hex`], [`texts`].
//! - [`llm_server::LlmServer`]: a scripted LLM provider on loopback.
//! - [`control`]: control-socket calls with request ids the test chooses
//!   (a retried command).
//! - [`rogue::RoguePeer`]: a peer cluster speaking the node-to-node protocol
//!   by its own rules (scripted failures, hostile calls).
//! - [`testnet::Testnet`]: hosts as network namespaces, with links to cut
//!   ([`Node::in_netns`] runs a node on one); [`testnet::Etcd`]: etcd
//!   members on them.
//! - [`history::History`]: a workload's operations and their outcomes,
//!   checked against what the recipients' inboxes hold.
//! - [`layout`]: issue 14's layering rules (no import circle, no file over
//!   800 lines, a `# Layout` crate doc), checked on a crate's source text
//!   (`tests/tests/layout.rs` applies them to `actors/src` and `nodes/src`).
//!
//! Every wait has a deadline: a hang fails the test instead of blocking it.

pub mod control;
pub mod fed;
pub mod history;
pub mod layout;
pub mod llm_server;
pub mod rogue;
pub mod testnet;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long one CLI command may take before the test fails: a safety net
/// for hung commands, not a timing check. `install` compiles the component
/// with a debug build of Cranelift, which takes about a minute for the
/// 150 KB llm-agent on a busy 2-core machine.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a killed or stopped daemon may take to disappear.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// The `capstan` binary under test.
///
/// `$CAPSTAN_BIN` if set; otherwise `cargo build -p capstan` is run once per
/// test process (a no-op when it is up to date) into the target directory
/// this test executable was built in (`<target>/<profile>/deps/<test>` →
/// `<target>/<profile>/capstan`), so the binary is never stale.
pub fn capstan_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("CAPSTAN_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable is in <target>/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir
            .parent()
            .expect("<target>/<profile>")
            .to_path_buf();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ is inside the workspace")
            .to_path_buf();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.arg("build")
            .arg("--quiet")
            .arg("--package")
            .arg("capstan")
            .arg("--bin")
            .arg("capstan")
            .arg("--manifest-path")
            .arg(workspace.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target_dir);
        if profile_dir.file_name() == Some(OsStr::new("release")) {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("running cargo build -p capstan");
        assert!(
            out.status.success(),
            "cargo build -p capstan failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = profile_dir.join("capstan");
        assert!(bin.exists(), "{} missing after cargo build", bin.display());
        bin
    })
}

/// The outcome of one command.
#[derive(Debug, Clone)]
pub struct Run {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    /// The command line, for failure messages.
    pub cmdline: String,
}

impl Run {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.code,
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        )
    }
}

/// A node's home directory and the daemon running on it.
pub struct Node {
    _dir: tempfile::TempDir,
    /// The home: the temporary directory, or a directory named inside it.
    home: PathBuf,
    /// Every daemon pid this node started (to clean up on drop).
    pids: Vec<i32>,
    /// The pid of the daemon started last.
    pid: Option<i32>,
    /// Environment for every command (and so the daemons `start` spawns).
    envs: Vec<(String, String)>,
    /// A command every capstan command runs under (`ip netns exec NS`).
    wrap: Vec<String>,
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Node {
    /// A fresh, empty home; no daemon yet.
    pub fn new() -> Node {
        let _ = capstan_bin();
        let dir = tempfile::Builder::new()
            .prefix("capstan-e2e-")
            .tempdir()
            .expect("temporary home");
        Node {
            home: dir.path().to_path_buf(),
            _dir: dir,
            pids: Vec::new(),
            pid: None,
            envs: Vec::new(),
            wrap: Vec::new(),
        }
    }

    /// Sets an environment variable for this node's commands and daemons.
    pub fn with_env(mut self, key: &str, value: &str) -> Node {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Runs this node's commands, and so the daemon `start` spawns, inside
    /// the network namespace `ns` (`ip netns exec NS capstan …`; the
    /// control socket is a file, reachable from any namespace).
    pub fn in_netns(mut self, ns: &str) -> Node {
        self.wrap = ["ip", "netns", "exec", ns]
            .iter()
            .map(|s| s.to_string())
            .collect();
        self
    }

    /// A fresh home called `name` (a cluster node's name is its home's).
    pub fn named(name: &str) -> Node {
        let mut n = Node::new();
        n.home = n._dir.path().join(name);
        std::fs::create_dir(&n.home).expect("named home");
        n
    }

    /// A fresh home with a daemon started on it.
    pub fn started() -> Node {
        let mut node = Node::new();
        node.start();
        node
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `capstan start --json`; asserts success and remembers the daemon's pid.
    pub fn start(&mut self) -> i32 {
        self.start_with(&[])
    }

    /// `capstan start --json EXTRA…` (for example `--listen 127.0.0.1:0`).
    pub fn start_with(&mut self, extra: &[&str]) -> i32 {
        let mut args = vec!["start"];
        args.extend_from_slice(extra);
        let v = self.json(args);
        let pid = v["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("start --json without a pid: {v}")) as i32;
        assert!(
            pid_alive(pid),
            "start reported pid {pid}, which is not running"
        );
        self.pids.push(pid);
        self.pid = Some(pid);
        pid
    }

    /// The pid of the running daemon: the one started last, else the pid file.
    pub fn daemon_pid(&self) -> i32 {
        if let Some(pid) = self.pid {
            return pid;
        }
        self.pid_from_file()
            .unwrap_or_else(|| panic!("no daemon pid known for {}", self.home().display()))
    }

    fn pid_from_file(&self) -> Option<i32> {
        std::fs::read_to_string(self.home().join("capstan.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILL the daemon and wait until it is gone.
    pub fn kill9(&mut self) {
        let pid = self.daemon_pid();
        kill(pid, libc::SIGKILL);
        wait_gone(pid, EXIT_TIMEOUT);
        self.pid = None;
    }

    /// `capstan stop`; asserts success and that the daemon is gone.
    pub fn stop(&mut self) {
        let pid = self.pid;
        let v = self.json(["stop"]);
        assert_eq!(v, serde_json::json!({"stopped": true}), "stop --json");
        if let Some(pid) = pid {
            wait_gone(pid, EXIT_TIMEOUT);
        }
        self.pid = None;
    }

    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = match self.wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(capstan_bin());
                c
            }
            None => Command::new(capstan_bin()),
        };
        cmd.arg("--home")
            .arg(self.home())
            .args(args)
            .env_remove("CAPSTAN_HOME")
            .env("NO_COLOR", "1")
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Spawns `capstan --home H ARGS` with piped stdin/stdout/stderr.
    pub fn spawn<I, S>(&self, args: I) -> Child
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning capstan")
    }

    /// Runs `capstan --home H ARGS` to completion (at most [`COMMAND_TIMEOUT`]).
    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_stdin(args, None)
    }

    /// Like [`Node::run`], feeding `stdin` to the command.
    pub fn run_stdin<I, S>(&self, args: I, stdin: Option<&[u8]>) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let cmdline = format!(
            "capstan {}",
            args.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut cmd = self.command(&args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawning capstan");
        finish(child, stdin.map(<[u8]>::to_vec), COMMAND_TIMEOUT, cmdline)
    }

    /// Runs `capstan --home H ARGS` for at most `timeout`: `None` when it
    /// did not finish (it is killed; what it asked of the daemon may still
    /// happen: an unknown outcome).
    pub fn run_for<I, S>(&self, args: I, timeout: Duration) -> Option<Run>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let cmdline = format!(
            "capstan {}",
            args.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let child = self
            .command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning capstan");
        try_finish(child, timeout, cmdline)
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let r = self.run(args);
        assert!(r.success(), "expected success: {r}");
        r.stdout_str()
    }

    /// Runs a command that must succeed; returns its raw stdout.
    pub fn ok_bytes<I, S>(&self, args: I) -> Vec<u8>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let r = self.run(args);
        assert!(r.success(), "expected success: {r}");
        r.stdout
    }

    /// Runs `capstan --json ARGS`, which must succeed and print exactly one JSON value.
    pub fn json<I, S>(&self, args: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let r = self.run(json_args(args));
        assert!(r.success(), "expected success: {r}");
        serde_json::from_slice(&r.stdout)
            .unwrap_or_else(|e| panic!("stdout is not exactly one JSON value ({e}): {r}"))
    }

    /// Runs a command that must fail; returns its exit code and stderr, after
    /// checking the error format of the contract (one line `capstan: …`).
    pub fn fail<I, S>(&self, args: I) -> (i32, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let r = self.run(args);
        assert!(!r.success(), "expected failure: {r}");
        let code = r.code.unwrap_or_else(|| panic!("killed by a signal: {r}"));
        assert_cli_error(&r);
        (code, r.stderr)
    }

    /// Like [`Node::fail`] with `--json`: errors keep the same format.
    pub fn fail_json<I, S>(&self, args: I) -> (i32, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.fail(json_args(args))
    }

    /// The names in `list --json` (with extra args, e.g. a path or `--as alice`).
    pub fn names(&self, extra: &[&str]) -> BTreeSet<String> {
        let mut args = vec!["list"];
        args.extend_from_slice(extra);
        let v = self.json(args);
        v.as_array()
            .unwrap_or_else(|| panic!("list --json is not an array: {v}"))
            .iter()
            .map(|e| e["name"].as_str().expect("entry name").to_owned())
            .collect()
    }

    /// `inbox --json` (with extra args, e.g. `--as alice`) as an array: the
    /// whole inbox, page after page (`inbox` lists at most 1000 messages
    /// unless told), or the one page asked for when `extra` names one.
    pub fn inbox(&self, extra: &[&str]) -> Vec<Value> {
        const PAGE: usize = 10_000;
        let one_page = extra.iter().any(|a| *a == "--limit" || *a == "--after");
        let mut all = Vec::new();
        let mut after: Option<u64> = None;
        loop {
            let mut args: Vec<String> = vec!["inbox".into()];
            args.extend(extra.iter().map(|a| a.to_string()));
            if !one_page {
                args.push("--limit".into());
                args.push(PAGE.to_string());
                if let Some(a) = after {
                    args.push("--after".into());
                    args.push(a.to_string());
                }
            }
            let v = self.json(&args);
            let page = v
                .as_array()
                .unwrap_or_else(|| panic!("inbox --json is not an array: {v}"))
                .clone();
            let full = page.len() == PAGE;
            after = page.last().and_then(|m| m["number"].as_u64());
            all.extend(page);
            if one_page || !full {
                return all;
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Stop gracefully when a daemon answers; kill whatever is left.
        let alive: Vec<i32> = self
            .pids
            .iter()
            .copied()
            .chain(self.pid_from_file())
            .filter(|&p| pid_alive(p) && is_capstan(p))
            .collect();
        if alive.is_empty() {
            return;
        }
        let cmd = self.command(["stop"]);
        let mut cmd = cmd;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Ok(mut child) = cmd.spawn() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        for pid in alive {
            let deadline = Instant::now() + Duration::from_secs(3);
            while pid_alive(pid) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if pid_alive(pid) && is_capstan(pid) {
                kill(pid, libc::SIGKILL);
                let deadline = Instant::now() + EXIT_TIMEOUT;
                while pid_alive(pid) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// `--json` followed by `args`.
pub fn json_args<I, S>(args: I) -> Vec<std::ffi::OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut v = vec![std::ffi::OsString::from("--json")];
    v.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
    v
}

/// Waits for `child` (feeding it `stdin`) at most `timeout`; kills it and
/// panics on timeout.
fn finish(mut child: Child, stdin: Option<Vec<u8>>, timeout: Duration, cmdline: String) -> Run {
    let pid = child.id() as i32;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => {
            let out = out.expect("waiting for capstan");
            Run {
                code: out.status.code(),
                stdout: out.stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                cmdline,
            }
        }
        Err(_) => {
            kill(pid, libc::SIGKILL);
            panic!(
                "`{cmdline}` did not finish within {timeout:?} (killed it; a daemon holding \
                 the command's stdout/stderr open also causes this)"
            );
        }
    }
}

/// Like [`finish`], but a timeout is `None` (the child killed and reaped).
fn try_finish(child: Child, timeout: Duration, cmdline: String) -> Option<Run> {
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => {
            let out = out.expect("waiting for capstan");
            Some(Run {
                code: out.status.code(),
                stdout: out.stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                cmdline,
            })
        }
        Err(_) => {
            // Still our child (not yet reaped by the waiting thread), so the
            // pid cannot have been reused.
            kill(pid, libc::SIGKILL);
            let _ = rx.recv_timeout(EXIT_TIMEOUT);
            None
        }
    }
}

/// Checks the contract's error format: stderr is one line `capstan: <message>`.
pub fn assert_cli_error(r: &Run) {
    let err = r.stderr.trim_end_matches('\n');
    assert!(
        err.starts_with("capstan: ") && !err.contains('\n') && err.len() > "capstan: ".len(),
        "stderr is not one line `capstan: <message>`: {r}"
    );
}

/// The exit status `nodes/CLI.md` gives a failure with this stderr: 3 when
/// what the command names does not exist (an unknown name or message
/// number), else 1 (bad input or a refusal).
pub fn user_error_exit(stderr: &str) -> i32 {
    if stderr.contains("unknown name") || stderr.contains("no message number") {
        3
    } else {
        1
    }
}

/// Whether `s` is lowercase hex of exactly `len` characters.
pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `v` is a lowercase-hex formula id (256 bits).
pub fn is_formula_id(v: &Value) -> bool {
    v.as_str().is_some_and(|s| is_hex(s, 64))
}

/// The `text` fields of inbox messages.
pub fn texts(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["text"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Whether `pid` is a live process. A zombie counts as gone once all its
/// threads have exited (only then are its files and sockets closed).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| d.count())
                .unwrap_or(0);
            !matches!(state, Some('Z') | Some('X') | None) || threads > 1
        }
        Err(_) => false,
    }
}

/// Whether `pid` runs the capstan binary (guards against pid reuse).
fn is_capstan(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("capstan"))
        .unwrap_or(false)
}

/// Waits until `pid` is gone; panics after `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} still alive after {timeout:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `sig` to `pid`.
#[allow(unsafe_code)]
pub fn kill(pid: i32, sig: i32) {
    assert!(pid > 0, "refusing to signal pid {pid}");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Reads lines of a child's stdout on a thread; [`LineReader::next`] waits
/// with a timeout.
pub struct LineReader {
    rx: mpsc::Receiver<String>,
}

impl LineReader {
    pub fn new(stdout: ChildStdout) -> LineReader {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        LineReader { rx }
    }

    /// The next line, or `None` after `timeout` or at end of output.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.rx.recv_timeout(timeout).ok()
    }
}

/// Kills a spawned child and reaps it; returns its stderr.
pub fn kill_child(mut child: Child) -> String {
    let _ = child.kill();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = child.wait();
    err
}

/// Waits for a spawned child at most `timeout`, collecting its output;
/// kills it and panics on timeout.
pub fn wait_child(child: Child, timeout: Duration, what: &str) -> Run {
    finish(child, None, timeout, what.to_owned())
}

/// A guest component built from guests/ (`NAME.wasm` in guests/out), built
/// once per test process by scripts/build-guests. An inherited
/// CARGO_TARGET_DIR is kept: build-guests builds beside it (reusing what
/// scripts/test built, and its wasm-tools) and unsets the host-compiler
/// variables itself.
pub fn guest_wasm(name: &str) -> String {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace")
            .to_path_buf();
        let status = std::process::Command::new(root.join("scripts/build-guests"))
            .env_remove("RUSTC")
            .env_remove("RUSTFLAGS")
            .status()
            .expect("run scripts/build-guests");
        assert!(status.success(), "scripts/build-guests failed");
        root.join("guests/out")
    });
    let p = dir.join(format!("{name}.wasm"));
    assert!(p.exists(), "{} was not built", p.display());
    p.display().to_string()
}

/// A fresh store spec `etcd://ENDPOINTS/capstan-e2e/TAG-NANOS` on the etcd
/// cluster of `CAPSTAN_ETCD_ENDPOINTS`, or `None` (the test is skipped)
/// when it is unset; with `CAPSTAN_REQUIRE_ETCD=1` an unset one fails.
pub fn etcd_spec(tag: &str) -> Option<String> {
    let eps = match std::env::var("CAPSTAN_ETCD_ENDPOINTS") {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            assert!(
                std::env::var("CAPSTAN_REQUIRE_ETCD").as_deref() != Ok("1"),
                "CAPSTAN_REQUIRE_ETCD=1 but CAPSTAN_ETCD_ENDPOINTS is not set: run scripts/etcd-cluster start"
            );
            eprintln!("skipped: set CAPSTAN_ETCD_ENDPOINTS (scripts/etcd-cluster start)");
            return None;
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    Some(format!("etcd://{eps}/capstan-e2e/{tag}-{nanos}"))
}

/// Whether `cluster members`, asked of node `n`, shows member `name` in
/// `state` (`live`, `draining`, `dead`); with the listing, for a message.
pub fn member_in_state(n: &Node, name: &str, state: &str) -> (bool, Value) {
    let members = n.json(["cluster", "members"]);
    let found = members
        .as_array()
        .is_some_and(|a| a.iter().any(|m| m["name"] == name && m["state"] == state));
    (found, members)
}

/// Counts of the calls node `n` made to other members (`cluster status`'s
/// `link_calls`: `reserve`, `wake`, `reserve_refused`, …), in the order
/// of `keys`.
pub fn link_call_counts<const N: usize>(n: &Node, keys: [&str; N]) -> [u64; N] {
    let v = n.json(["cluster", "status"]);
    keys.map(|k| {
        v["link_calls"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("cluster status without link call count {k}: {v}"))
    })
}

/// Calls `f` every 100 ms until `pred` holds for what it returns (which
/// is returned); fails the test after `secs` seconds, showing the last.
pub fn wait_until(
    what: &str,
    secs: u64,
    f: impl Fn() -> Value,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = f();
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "waited {secs} s for {what}; last: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `n` as a member of the cluster in the etcd store `spec` whose
/// secrets key is the file `key`, listening on a free loopback port.
pub fn start_member(n: &mut Node, spec: &str, key: &str) -> i32 {
    n.start_with(&[
        "--store",
        spec,
        "--listen",
        "127.0.0.1:0",
        "--secrets-key",
        key,
    ])
}

/// `count` nodes `n1…` on the etcd store `spec` with a lease of `lease_ms`:
/// n1 runs `cluster init`, every node starts with `--listen 127.0.0.1:0`
/// and the cluster's secrets key; returns once all are live members (at
/// most 30 s).
pub fn start_cluster(spec: &str, count: usize, lease_ms: &str) -> Vec<Node> {
    let mut nodes = Vec::new();
    let mut key = String::new();
    for i in 1..=count {
        let mut n = Node::named(&format!("n{i}")).with_env("CAPSTAN_LEASE_MS", lease_ms);
        if i == 1 {
            let v = n.json(["cluster", "init", "--store", spec]);
            key = v["secrets_key"]
                .as_str()
                .expect("init names its secrets key")
                .to_string();
        }
        start_member(&mut n, spec, &key);
        nodes.push(n);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = nodes[0].json(["cluster", "members"]);
        let live = m
            .as_array()
            .map_or(0, |a| a.iter().filter(|m| m["state"] == "live").count());
        if live == count {
            return nodes;
        }
        assert!(Instant::now() < deadline, "members: {m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
