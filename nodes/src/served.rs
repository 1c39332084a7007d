//! The address an HTTP server of the daemon (`--metrics`, `--console`) was
//! bound to, remembered in a file of the home (`HOST:PORT [public]`) so
//! that later starts serve it again and `status` can show it.

use std::net::SocketAddr;

use anyhow::{anyhow, bail};

use crate::home::Paths;

/// The address and public mark remembered in `<home>/<file>`, if any;
/// `flag` (e.g. `--metrics`) names the option in the error for a damaged file.
pub fn remembered(
    paths: &Paths,
    file: &str,
    flag: &str,
) -> anyhow::Result<Option<(SocketAddr, bool)>> {
    let path = paths.home.join(file);
    let text = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
    };
    let mut words = text.split_whitespace();
    let Some(addr) = words.next() else {
        return Ok(None);
    };
    let bad = || {
        anyhow!(
            "{} does not hold a HOST:PORT [public]; fix it, or remove it and pass {flag}",
            path.display()
        )
    };
    let addr: SocketAddr = addr.parse().map_err(|_| bad())?;
    let public = match (words.next(), words.next()) {
        (None, _) => false,
        (Some("public"), None) => true,
        _ => return Err(bad()),
    };
    Ok(Some((addr, public)))
}

/// Remembers the bound address (and public mark) in `<home>/<file>`.
pub fn remember(paths: &Paths, file: &str, addr: SocketAddr, public: bool) -> anyhow::Result<()> {
    let path = paths.home.join(file);
    let line = if public {
        format!("{addr} public\n")
    } else {
        format!("{addr}\n")
    };
    std::fs::write(&path, line).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

/// What to serve on: `given` (with `public` as given), else the address
/// remembered in `<home>/<file>` (its public mark, or `public`); `public`
/// without either is refused (`{flag}-public needs {flag} HOST:PORT`).
pub fn choose(
    paths: &Paths,
    file: &str,
    flag: &str,
    given: Option<SocketAddr>,
    public: bool,
) -> anyhow::Result<Option<(SocketAddr, bool)>> {
    match given {
        Some(addr) => Ok(Some((addr, public))),
        None => match remembered(paths, file, flag)? {
            Some((addr, was_public)) => Ok(Some((addr, was_public || public))),
            None if public => bail!("{flag}-public needs {flag} HOST:PORT"),
            None => Ok(None),
        },
    }
}
