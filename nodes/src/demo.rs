//! `capstan demo`: a guided tour on a temporary home. It runs this very
//! binary as subprocesses (`capstan --home TMP …`), printing each command and
//! its output, kills the daemon with SIGKILL half-way and shows that the
//! pending request survived.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use capstan_proto::RequestId;

use crate::daemon::{HomeLock, Paths};

struct Tour {
    exe: PathBuf,
    home: PathBuf,
}

impl Tour {
    fn say(&self, text: &str) {
        println!();
        for line in text.lines() {
            println!("# {line}");
        }
    }

    /// Runs `capstan ARGS` on the demo home, echoing it and its output.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let shown: Vec<String> = args.iter().map(|a| shell_word(a)).collect();
        println!("$ capstan {}", shown.join(" "));
        let out = Command::new(&self.exe)
            .args(args)
            .arg("--home")
            .arg(&self.home)
            .env_remove("CAPSTAN_HOME")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{stdout}");
        if !stdout.is_empty() && !stdout.ends_with('\n') {
            println!();
        }
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("step `capstan {}` failed ({})", shown.join(" "), out.status);
        }
        Ok(stdout)
    }
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

    t.say("Stop the daemon.");
    t.run(&["stop"])?;
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
    let home = std::env::temp_dir().join(format!(
        "capstan-demo-{}",
        &RequestId::random().to_hex()[..12]
    ));
    println!("Capstan demo: a node, a guest, mail with references, a crash and a restart.");
    println!("Temporary home: {}", home.display());
    let tour_home = Tour {
        exe: exe.clone(),
        home: home.clone(),
    };
    let result = tour(&tour_home);
    cleanup(&exe, &home);
    result?;
    println!();
    println!(
        "Done: the request made before the crash was answered after it. Removed {}.",
        home.display()
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
