//! The home directory of a node: its layout ([`Paths`], the control
//! socket's path included), private permissions, the lock that keeps one
//! daemon per home, what earlier starts remembered there (store, listen and
//! advertised addresses), the secrets key installed in it, and the bound on
//! a control-socket message that both ends read with ([`reader_options`]).
//! Shared by the daemon and the commands.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use tracing::info;

use crate::net::advertise::Advertise;

/// Largest Cap'n Proto message accepted on the control socket.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Longest socket path used inside the home; longer ones go to `/tmp`.
const MAX_SOCKET_PATH: usize = 100;

/// Reader options of every control-socket connection (both ends).
pub fn reader_options() -> capnp::message::ReaderOptions {
    let mut o = capnp::message::ReaderOptions::new();
    o.traversal_limit_in_words(Some(MAX_MESSAGE_BYTES / 8));
    o
}

/// The files of a node's home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub home: PathBuf,
    pub socket: PathBuf,
    pub store: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    pub lock: PathBuf,
}

impl Paths {
    /// The paths of `home` (default `$CAPSTAN_HOME`, then `~/.capstan`), made absolute.
    pub fn resolve(home: Option<PathBuf>) -> anyhow::Result<Paths> {
        let home = match home {
            Some(h) if !h.as_os_str().is_empty() => h,
            _ => {
                let base = std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| {
                        anyhow!("cannot find the home directory: set --home DIR or CAPSTAN_HOME")
                    })?;
                PathBuf::from(base).join(".capstan")
            }
        };
        let home = std::path::absolute(&home)
            .with_context(|| format!("bad home directory {}", home.display()))?;
        Ok(Paths::new(home, &uid()))
    }

    /// The layout of `home` (absolute).
    pub fn new(home: PathBuf, uid: &str) -> Paths {
        let mut socket = home.join("capstan.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            let hash = blake3::hash(home.as_os_str().as_encoded_bytes());
            let short = &hash.to_hex()[..16];
            socket = PathBuf::from(format!("/tmp/capstan-{uid}/{short}.sock"));
        }
        Paths {
            store: home.join("store.redb"),
            log: home.join("capstan.log"),
            pid_file: home.join("capstan.pid"),
            lock: home.join("capstan.lock"),
            socket,
            home,
        }
    }

    pub fn home_str(&self) -> String {
        self.home.display().to_string()
    }
}

/// The current user's id (the owner of `/proc/self`), for the `/tmp` socket directory.
pub(crate) fn uid() -> String {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid().to_string())
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "user".to_string())
}

/// Creates a directory (and parents) with mode 0700 if it does not exist.
pub(crate) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))
}

/// Takes group and other permissions off the home and the files Capstan
/// keeps in it (homes made by earlier versions were created with the
/// default umask: a world-readable store and log). Only Capstan's own
/// entries are touched (a home may be a directory that holds other
/// things). Best effort: a failure is logged.
pub(crate) fn make_private(home: &Path) {
    fn tighten(path: &Path) {
        let Ok(m) = std::fs::symlink_metadata(path) else {
            return;
        };
        if m.file_type().is_symlink() || m.mode() & 0o077 == 0 {
            return;
        }
        let mode = std::fs::Permissions::from_mode(m.mode() & 0o700);
        if let Err(e) = std::fs::set_permissions(path, mode) {
            tracing::warn!(path = %path.display(), error = %e, "cannot take group and other permissions off");
        }
    }
    tighten(home);
    let Ok(entries) = std::fs::read_dir(home) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("capstan.")
            || name.starts_with("store")
            || matches!(
                name.as_str(),
                "identity" | "compiled" | "listen" | "advertise" | "metrics"
            );
        if !ours {
            continue;
        }
        tighten(&e.path());
        if matches!(name.as_str(), "identity" | "compiled")
            && let Ok(inner) = std::fs::read_dir(e.path())
        {
            for f in inner.flatten() {
                tighten(&f.path());
            }
        }
    }
}

/// The daemon's exclusive lock on its home (`capstan.lock`, holding its pid).
#[derive(Debug)]
pub struct HomeLock {
    _file: File,
}

/// Why the home lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("a capstan daemon already runs for home {home} (pid {pid})")]
    Held { home: String, pid: String },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl HomeLock {
    /// Takes the lock and writes our pid into it.
    pub fn acquire(paths: &Paths) -> Result<HomeLock, LockError> {
        let io = |source| LockError::Io {
            path: paths.lock.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&paths.lock)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(io)?;
                file.rewind().map_err(io)?;
                writeln!(file, "{}", std::process::id()).map_err(io)?;
                Ok(HomeLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                Err(LockError::Held {
                    home: paths.home_str(),
                    pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }

    /// True when no process holds the lock (the daemon has exited).
    pub fn is_free(paths: &Paths) -> bool {
        match File::open(&paths.lock) {
            Ok(f) => match f.try_lock() {
                Ok(()) => {
                    let _ = f.unlock();
                    true
                }
                Err(_) => false,
            },
            Err(_) => true,
        }
    }
}

/// The pid named in a store's `Locked` detail ("… held by pid N").
pub(crate) fn pid_in(detail: &str) -> String {
    detail
        .rsplit("pid ")
        .next()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
        .unwrap_or_else(|| "unknown".to_string())
}

/// The store a command works on: `given`, else the one a previous
/// `start --store` left in the home, else the home's `store.redb`.
pub fn store_spec(paths: &Paths, given: Option<&str>) -> anyhow::Result<String> {
    Ok(match given {
        Some(s) => s.to_string(),
        None => {
            remembered_store(paths)?.unwrap_or_else(|| paths.store.to_string_lossy().to_string())
        }
    })
}

/// The store spec a previous `--store` left in the home, if any.
pub(crate) fn remembered_store(paths: &Paths) -> anyhow::Result<Option<String>> {
    let file = paths.home.join("store-spec");
    match std::fs::read_to_string(&file) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("cannot read {}: {e}", file.display())),
    }
}

/// The addresses a previous `--advertise` left in the home, if any.
pub(crate) fn remembered_advertise(paths: &Paths) -> anyhow::Result<Option<Advertise>> {
    let file = paths.home.join("advertise");
    match std::fs::read_to_string(&file) {
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => Advertise::parse(s.trim()).map(Some).map_err(|e| {
            anyhow!(
                "{} holds no valid addresses ({e}); fix it, or remove it and pass --advertise",
                file.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("cannot read {}: {e}", file.display())),
    }
}

/// The addresses other nodes dial, as the home remembers them (the listen
/// address, or what `--advertise` named with its bound port), if any.
pub fn advertised(paths: &Paths) -> Option<Vec<String>> {
    let listen = remembered_listen(paths).ok()??;
    match remembered_advertise(paths).ok()? {
        Some(a) => Some(a.addrs(listen.port())),
        None => Some(vec![listen.to_string()]),
    }
}

/// The listen address a previous `--listen` left in the home, if any.
pub(crate) fn remembered_listen(paths: &Paths) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let file = paths.home.join("listen");
    match std::fs::read_to_string(&file) {
        Ok(s) => s.trim().parse().map(Some).map_err(|_| {
            anyhow!(
                "{} does not hold a HOST:PORT; fix it, or remove it and pass --listen",
                file.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("cannot read {}: {e}", file.display())),
    }
}

/// The last `n` lines of the log, for error messages.
pub(crate) fn log_tail(paths: &Paths, n: usize) -> String {
    let text = std::fs::read(&paths.log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `start --secrets-key FILE`: copies the key to `<home>/identity/secrets.key`
/// (mode 0600), where the node reads it from then on. The same key again
/// changes nothing; another one is refused (nothing changed).
pub fn install_secrets_key(paths: &Paths, file: &std::path::Path) -> anyhow::Result<()> {
    use capstan_actors::secrets::{self, SecretsKey};
    let key = SecretsKey::load(file).map_err(|e| anyhow!("--secrets-key: {e}"))?;
    let dest = secrets::home_key_path(&paths.home);
    match SecretsKey::load_if_present(&dest).map_err(|e| anyhow!("{e}"))? {
        Some(have) if have.id_hex() == key.id_hex() => Ok(()),
        Some(have) => bail!(
            "{} already holds another secrets key (key id {}) than {} (key id {}): a home keeps one secrets key; use a fresh --home, or move that file away if no store needs it",
            dest.display(),
            have.id_hex(),
            file.display(),
            key.id_hex()
        ),
        None => {
            create_private_dir(&paths.home)?;
            key.write_new(&dest).map_err(|e| anyhow!("{e}"))?;
            info!(file = %dest.display(), key_id = %key.id_hex(), "installed the secrets key");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let p = Paths::new(PathBuf::from("/h"), "1000");
        assert_eq!(p.socket, PathBuf::from("/h/capstan.sock"));
        assert_eq!(p.store, PathBuf::from("/h/store.redb"));
        assert_eq!(p.pid_file, PathBuf::from("/h/capstan.pid"));
        let long = PathBuf::from(format!("/{}", "x".repeat(100)));
        let p = Paths::new(long, "1000");
        let s = p.socket.to_string_lossy().to_string();
        assert!(s.starts_with("/tmp/capstan-1000/"), "{s}");
        assert!(s.ends_with(".sock") && s.len() == "/tmp/capstan-1000/".len() + 16 + 5);
    }

    #[test]
    fn pid_from_store_lock_detail() {
        assert_eq!(pid_in("/h/store.redb.lock is held by pid 42"), "42");
        assert_eq!(pid_in("redb reports the database already open"), "unknown");
    }

    #[test]
    fn home_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path().to_path_buf(), "0");
        assert!(HomeLock::is_free(&paths));
        let lock = HomeLock::acquire(&paths).unwrap();
        // flock locks belong to open file descriptions, so a second open conflicts.
        assert!(!HomeLock::is_free(&paths));
        let e = HomeLock::acquire(&paths).unwrap_err().to_string();
        assert!(e.contains(&format!("(pid {})", std::process::id())), "{e}");
        drop(lock);
        assert!(HomeLock::is_free(&paths));
    }
}
