//! `capstan demo`: a guided tour on a temporary home. It runs this very
//! binary as subprocesses (`capstan --home TMP …`), printing each command and
//! its output, kills the daemon with SIGKILL half-way and shows that the
//! pending request survived. Then the network part: a second node on its
//! own temporary home reads a value of the first over QUIC on loopback
//! (`locate`, `adopt-locator`, `cat`) until the first revokes it (`cancel`).
//! Both daemons are stopped and both homes removed at the end, also when a
//! step fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use capstan_proto::RequestId;

use crate::home::{HomeLock, Paths};

struct Tour {
    exe: PathBuf,
    home: PathBuf,
    /// Whether to show `--home HOME` in the commands printed (with two
    /// nodes, to say which one a command talks to).
    show_home: bool,
}

impl Tour {
    fn say(&self, text: &str) {
        println!();
        for line in text.lines() {
            println!("# {line}");
        }
    }

    /// The same tour on the same home, printing `--home HOME` in commands.
    fn showing_home(&self) -> Tour {
        Tour {
            exe: self.exe.clone(),
            home: self.home.clone(),
            show_home: true,
        }
    }

    /// Echoes `capstan ARGS`, runs it on the demo home; its command line
    /// as shown and its output.
    fn exec(&self, args: &[&str]) -> anyhow::Result<(String, std::process::Output)> {
        let mut shown: Vec<String> = Vec::new();
        if self.show_home {
            shown.push("--home".into());
            shown.push(shell_word(&self.home.display().to_string()));
        }
        shown.extend(args.iter().map(|a| shell_word(a)));
        let shown = shown.join(" ");
        println!("$ capstan {shown}");
        let out = Command::new(&self.exe)
            .args(args)
            .arg("--home")
            .arg(&self.home)
            .env_remove("CAPSTAN_HOME")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        print!("{stdout}");
        if !stdout.is_empty() && !stdout.ends_with('\n') {
            println!();
        }
        Ok((shown, out))
    }

    /// Runs `capstan ARGS` on the demo home, echoing it and its output.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let (shown, out) = self.exec(args)?;
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("step `capstan {shown}` failed ({})", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `capstan ARGS`, which must fail with an error containing
    /// `expected`; the error is part of the tour, so it goes to stdout.
    fn run_failing(&self, args: &[&str], expected: &str) -> anyhow::Result<()> {
        let (shown, out) = self.exec(args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        print!("{err}");
        if out.status.success() {
            bail!("step `capstan {shown}` succeeded, but it should have failed ({expected})");
        }
        if !err.contains(expected) {
            bail!("step `capstan {shown}` failed without saying {expected:?}");
        }
        println!(
            "(exit status {}: it failed, as it should)",
            exit_code(&out.status)
        );
        Ok(())
    }
}

fn exit_code(status: &std::process::ExitStatus) -> String {
    status
        .code()
        .map(|c| c.to_string())
        .unwrap_or_else(|| status.to_string())
}

/// Quotes a word for display the way a shell user would type it.
fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@:/=".contains(c))
    {
        w.to_string()
    } else {
        format!("\"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

fn kill9(pid: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-9", pid])
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        bail!("kill -9 {pid} failed ({status})");
    }
    Ok(())
}

fn tour(t: &Tour) -> anyhow::Result<()> {
    let paths = Paths::resolve(Some(t.home.clone()))?;
    t.say("Start a node daemon. It keeps everything in one store file in its home.");
    t.run(&["start"])?;

    t.say(
        "Make a guest: a confined agent that holds only what it is given.\n\
         You are the root host of this node: full authority over your own names.",
    );
    t.run(&["mkguest", "alice"])?;

    t.say("Store a value under a pet name. Names are yours alone; ids are unforgeable.");
    t.run(&["store", "--text", "hello [world]", "--name", "greeting"])?;

    t.say("Send alice a message; `@greeting` embeds a reference to the value, not a copy of its name.");
    t.run(&["send", "alice", "here is @greeting"])?;

    t.say("Act as alice (`--as alice`): her inbox has the package.");
    t.run(&["inbox", "--as", "alice"])?;

    t.say("Alice adopts the reference under a name of her own, then reads it.");
    t.run(&["adopt", "0", "greeting", "--name", "g", "--as", "alice"])?;
    t.run(&["cat", "g", "--as", "alice"])?;

    t.say("Alice asks her host for something; the answer will land under her name `doc`.");
    t.run(&[
        "request",
        "HOST",
        "need a doc",
        "--name",
        "doc",
        "--as",
        "alice",
    ])?;
    t.run(&["inbox"])?;

    let pid = std::fs::read_to_string(&paths.pid_file)
        .with_context(|| format!("cannot read {}", paths.pid_file.display()))?;
    let pid = pid.trim();
    t.say(&format!(
        "Now crash the daemon: kill -9 {pid}. Every acknowledged change was committed first."
    ));
    println!("$ kill -9 {pid}");
    kill9(pid)?;
    let pid_num: u32 = pid.parse().context("bad pid file")?;
    wait_dead(&paths, pid_num)?;

    t.say("Start it again: the request is still pending, durable in the store.");
    t.run(&["start"])?;
    t.run(&["inbox"])?;

    t.say("Resolve request 1 with the greeting; alice's `doc` now names it.");
    t.run(&["resolve", "1", "greeting"])?;
    t.run(&["show", "doc", "--as", "alice"])?;
    t.run(&["cat", "doc", "--as", "alice"])?;
    Ok(())
}

/// The network part: node A (`a`, the tour's node, running) and a second
/// node B on its own home. Leaves both stopped.
fn network(a: &Tour, b: &Tour) -> anyhow::Result<()> {
    let (a, b) = (a.showing_home(), b.showing_home());
    a.say(
        "The network part: a second node B on this machine, with a home of its own.\n\
         Nodes talk QUIC. Restart node A listening on a loopback port (port 0: any free one).",
    );
    a.run(&["stop"])?;
    a.run(&["start", "--listen", "127.0.0.1:0"])?;
    b.run(&["start"])?;

    a.say(
        "On A, make a locator for `greeting`: a durable reference other nodes can use.\n\
         It names A's cluster by its key and carries a secret (the swiss number).",
    );
    let locator = a.run(&["locate", "greeting"])?;
    let locator = locator.trim();
    if !locator.starts_with("capstan://") {
        bail!("`capstan locate` printed no locator: {locator:?}");
    }

    b.say(
        "On B, adopt the locator under a pet name of B's: B checks it with A's cluster first.\n\
         Then read it: B dials A, which proves it holds that cluster's key, and answers.",
    );
    b.run(&["adopt-locator", locator, "--name", "greeting-from-a"])?;
    b.run(&["cat", "greeting-from-a"])?;

    a.say("A revokes every locator of `greeting` (A's own name for it still works).");
    a.run(&["cancel", "greeting"])?;
    b.say("B's next read fails: the capability was revoked.");
    b.run_failing(&["cat", "greeting-from-a"], "revoked")?;
    a.run(&["cat", "greeting"])?;

    a.say("Stop both daemons.");
    a.run(&["stop"])?;
    b.run(&["stop"])?;
    Ok(())
}

fn wait_dead(paths: &Paths, pid: u32) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !HomeLock::is_free(paths) {
        if std::time::Instant::now() > deadline {
            bail!("pid {pid} is still running after kill -9");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Stops a daemon left running by a failed tour (best effort).
fn cleanup(exe: &Path, home: &Path) {
    if let Ok(paths) = Paths::resolve(Some(home.to_path_buf()))
        && !HomeLock::is_free(&paths)
    {
        let _ = Command::new(exe)
            .args(["stop", "--home"])
            .arg(home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !HomeLock::is_free(&paths)
            && let Ok(pid) = std::fs::read_to_string(&paths.pid_file)
        {
            let _ = kill9(pid.trim());
        }
    }
    let _ = std::fs::remove_dir_all(home);
}

/// `capstan demo`.
pub fn run() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the capstan executable")?;
    let base = std::env::temp_dir().join(format!(
        "capstan-demo-{}",
        &RequestId::random().to_hex()[..12]
    ));
    let home = base.join("a");
    let home_b = base.join("b");
    std::fs::create_dir_all(&home)
        .and_then(|()| std::fs::create_dir_all(&home_b))
        .with_context(|| format!("cannot make {}", base.display()))?;
    println!(
        "Capstan demo: a node, a guest, mail with references, a crash and a restart;\n\
         then a second node reading a capability of the first over the network, until it is revoked."
    );
    println!(
        "Temporary homes: {} (node A), {} (node B)",
        home.display(),
        home_b.display()
    );
    let a = Tour {
        exe: exe.clone(),
        home: home.clone(),
        show_home: false,
    };
    let b = Tour {
        exe: exe.clone(),
        home: home_b.clone(),
        show_home: true,
    };
    let result = tour(&a).and_then(|()| network(&a, &b));
    cleanup(&exe, &home);
    cleanup(&exe, &home_b);
    let _ = std::fs::remove_dir_all(&base);
    result?;
    println!();
    println!(
        "Done: the request made before the crash was answered after it, and a capability\n\
         used across nodes stopped working when revoked. Removed {}.",
        base.display()
    );
    println!("Try it on your own node: `capstan start`, then `capstan --help`.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_display() {
        assert_eq!(shell_word("greeting"), "greeting");
        assert_eq!(shell_word("hello [world]"), "\"hello [world]\"");
        assert_eq!(shell_word("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(shell_word(""), "\"\"");
    }
}
