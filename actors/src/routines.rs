//! Routines (`capstan routine …`): a host mails one of its agents on a
//! schedule (`--every 30s` or a 5-field `--cron` expression, in UTC).
//!
//! | key | value |
//! |---|---|
//! | `("rt", "r", id)` | [`RoutineRec`] (JSON): the routine and the last tick it fired |
//! | `("rt", "n", host, name)` | the routine's id |
//!
//! **Who fires.** Every node looks at the routines every
//! [`POLL`] (reading them from the store every [`REFRESH`], so a routine
//! added on any node is seen within it); a routine that is due is fired
//! by its owner only: the node
//! holding the placement of the routine's id (the same lease-guarded
//! placement as an agent's; a lone node owns everything). When the owner
//! dies, the next node that sees the routine due claims it.
//!
//! **Exactly once per tick.** A fire is an ordinary send from the host
//! with a request id derived from (routine id, tick time): a retry, or a
//! second fire of the same tick by an ex-owner after a failover, is
//! answered from the first one's exactly-once record and delivers
//! nothing more. The tick is then recorded as the last one fired.
//!
//! **Missed ticks.** Ticks that passed while no node could fire (every
//! node down) are not made up one by one: the routine fires once, for the
//! latest tick passed, then goes on with the schedule.

use std::sync::Arc;
use std::time::Duration;

use capstan_cluster::tuple::TupleKey;
use capstan_proto::{FormulaId, RequestId};
use serde::{Deserialize, Serialize};

use crate::agent::AgentHandle;

use crate::clock::now_ms;
use crate::error::Error;
use crate::node::{Inner, Runtime};

/// Most routines one host may have.
pub const MAX_ROUTINES_PER_HOST: usize = 1000;
/// Most routines a node looks at (all hosts together).
pub const MAX_ROUTINES: usize = 100_000;
/// Shortest interval of `--every`.
pub const MIN_EVERY_MS: u64 = 1000;
/// Longest interval of `--every` (a year).
pub const MAX_EVERY_MS: u64 = 366 * 86_400_000;
/// Largest routine text.
pub const MAX_ROUTINE_TEXT: usize = 16 * 1024;
/// How often each node looks for routines that are due.
pub const POLL: Duration = Duration::from_millis(200);
/// How often the poller reads the routines again (a routine added, on any
/// node, is seen within this); between reads it works from its copy.
pub const REFRESH: Duration = Duration::from_secs(1);
/// Routines read per page.
const PAGE: usize = 1000;

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;
/// How far ahead a cron expression is searched for its next tick.
const CRON_HORIZON_DAYS: u64 = 5 * 366;

fn rec_key(id: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("rt")
        .str("r")
        .bytes(id.as_bytes())
        .into_vec()
}
fn recs_prefix() -> Vec<u8> {
    TupleKey::new().str("rt").str("r").into_vec()
}
fn name_key(host: &FormulaId, name: &str) -> Vec<u8> {
    TupleKey::new()
        .str("rt")
        .str("n")
        .bytes(host.as_bytes())
        .str(name)
        .into_vec()
}
fn names_prefix(host: &FormulaId) -> Vec<u8> {
    TupleKey::new()
        .str("rt")
        .str("n")
        .bytes(host.as_bytes())
        .into_vec()
}

/// When a routine fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// At every multiple of `ms` since the Unix epoch.
    Every { ms: u64 },
    /// At every minute a 5-field cron expression matches (UTC).
    Cron { expr: String },
}

impl Schedule {
    /// `--every DURATION`: `30s`, `5m`, `1h`, `2d` (a number and a unit),
    /// at least 1 s and at most a year.
    pub fn every(s: &str) -> Result<Schedule, Error> {
        let bad = |why: &str| {
            Error::Invalid(format!(
                "invalid --every {s:?}: {why}; give a number and a unit (s, m, h or d), e.g. 30s, 5m, 1h"
            ))
        };
        let s2 = s.trim();
        let split = s2
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| bad("no unit"))?;
        let (n, unit) = s2.split_at(split);
        let n: u64 = n.parse().map_err(|_| bad("no number"))?;
        let mult = match unit {
            "s" => 1000,
            "m" => MINUTE_MS,
            "h" => 3_600_000,
            "d" => DAY_MS,
            _ => return Err(bad("unknown unit")),
        };
        let ms = n.checked_mul(mult).ok_or_else(|| bad("too long"))?;
        if ms < MIN_EVERY_MS {
            return Err(bad("the shortest interval is 1s"));
        }
        if ms > MAX_EVERY_MS {
            return Err(bad("the longest interval is 366d"));
        }
        Ok(Schedule::Every { ms })
    }

    /// `--cron EXPR`: five fields, minute hour day-of-month month
    /// day-of-week, in UTC; each `*`, a number, a range `a-b`, a step
    /// `*/n` or `a-b/n`, or a comma-separated list of those.
    pub fn cron(s: &str) -> Result<Schedule, Error> {
        let c = Cron::parse(s).map_err(|why| {
            Error::Invalid(format!(
                "invalid --cron {s:?}: {why}; give five fields: minute hour day-of-month month day-of-week (UTC), e.g. \"*/5 * * * *\""
            ))
        })?;
        if c.next_after(now_ms()).is_none() {
            return Err(Error::Invalid(format!(
                "invalid --cron {s:?}: it never fires (no such date in the next five years)"
            )));
        }
        Ok(Schedule::Cron {
            expr: s.split_whitespace().collect::<Vec<_>>().join(" "),
        })
    }

    /// The first tick after `t_ms` (none for a cron expression that never
    /// matches again).
    pub fn next_after(&self, t_ms: u64) -> Option<u64> {
        match self {
            Schedule::Every { ms } => Some((t_ms / ms + 1) * ms),
            Schedule::Cron { expr } => Cron::parse(expr).ok()?.next_after(t_ms),
        }
    }

    /// The latest tick at or before `now_ms` that is after `after_ms`.
    pub fn latest_due(&self, after_ms: u64, now_ms: u64) -> Option<u64> {
        match self {
            Schedule::Every { ms } => {
                let t = now_ms / ms * ms;
                (t > after_ms).then_some(t)
            }
            Schedule::Cron { expr } => {
                let c = Cron::parse(expr).ok()?;
                // Only the last year of missed ticks is looked at.
                let mut t = c.next_after(after_ms.max(now_ms.saturating_sub(366 * DAY_MS)))?;
                if t > now_ms {
                    return None;
                }
                while let Some(n) = c.next_after(t) {
                    if n > now_ms {
                        break;
                    }
                    t = n;
                }
                Some(t)
            }
        }
    }

    /// `every 30s` or `cron */5 * * * *`.
    pub fn describe(&self) -> String {
        match self {
            Schedule::Every { ms } => format!("every {}", duration_text(*ms)),
            Schedule::Cron { expr } => format!("cron {expr}"),
        }
    }
}

fn duration_text(ms: u64) -> String {
    if ms.is_multiple_of(DAY_MS) {
        format!("{}d", ms / DAY_MS)
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(MINUTE_MS) {
        format!("{}m", ms / MINUTE_MS)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// A parsed 5-field cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    doms: u64,
    months: u64,
    dows: u64,
    dom_any: bool,
    dow_any: bool,
}

fn field(s: &str, lo: u64, hi: u64, what: &str) -> Result<u64, String> {
    let mut mask = 0u64;
    if s.is_empty() {
        return Err(format!("empty {what} field"));
    }
    for part in s.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, st)) => {
                let st: u64 = st
                    .parse()
                    .map_err(|_| format!("bad step {st:?} in the {what} field"))?;
                if st == 0 || st > hi {
                    return Err(format!("step {st} out of range in the {what} field"));
                }
                (r, st)
            }
            None => (part, 1),
        };
        let num = |x: &str| -> Result<u64, String> {
            let v: u64 = x
                .parse()
                .map_err(|_| format!("bad value {x:?} in the {what} field"))?;
            if v < lo || v > hi {
                return Err(format!(
                    "{v} is out of range in the {what} field ({lo}-{hi})"
                ));
            }
            Ok(v)
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("range {range} is backwards in the {what} field"));
            }
            (a, b)
        } else {
            let a = num(range)?;
            (a, if step > 1 { hi } else { a })
        };
        let mut v = a;
        while v <= b {
            mask |= 1 << v;
            v += step;
        }
    }
    Ok(mask)
}

/// Days since 1970-01-01 as (year, month 1-12, day 1-31).
fn civil(days: u64) -> (i64, u64, u64) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_text(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

impl Cron {
    pub fn parse(s: &str) -> Result<Cron, String> {
        let f: Vec<&str> = s.split_whitespace().collect();
        if f.len() != 5 {
            return Err(format!("{} fields instead of 5", f.len()));
        }
        let mut dows = field(f[4], 0, 7, "day-of-week")?;
        if dows & (1 << 7) != 0 {
            dows = (dows | 1) & !(1 << 7); // 7 is Sunday too
        }
        Ok(Cron {
            minutes: field(f[0], 0, 59, "minute")?,
            hours: field(f[1], 0, 23, "hour")?,
            doms: field(f[2], 1, 31, "day-of-month")?,
            months: field(f[3], 1, 12, "month")?,
            dows,
            dom_any: f[2] == "*",
            dow_any: f[4] == "*",
        })
    }

    fn day_matches(&self, days: u64) -> bool {
        let (_, m, d) = civil(days);
        if self.months & (1 << m) == 0 {
            return false;
        }
        let dow = (days + 4) % 7; // 1970-01-01 was a Thursday
        let dom_ok = self.doms & (1 << d) != 0;
        let dow_ok = self.dows & (1 << dow) != 0;
        // Standard cron: with both restricted, either matches.
        match (self.dom_any, self.dow_any) {
            (true, true) => true,
            (true, false) => dow_ok,
            (false, true) => dom_ok,
            (false, false) => dom_ok || dow_ok,
        }
    }

    /// The first matching minute after `t_ms`, within five years.
    pub fn next_after(&self, t_ms: u64) -> Option<u64> {
        let mut m = t_ms / MINUTE_MS + 1;
        let end = m + CRON_HORIZON_DAYS * 1440;
        while m < end {
            let days = m / 1440;
            if !self.day_matches(days) {
                m = (days + 1) * 1440;
                continue;
            }
            let min_of_day = m % 1440;
            let (h, mi) = (min_of_day / 60, min_of_day % 60);
            if self.hours & (1 << h) == 0 {
                m = m - mi + 60;
                continue;
            }
            if self.minutes & (1 << mi) != 0 {
                return Some(m * MINUTE_MS);
            }
            m += 1;
        }
        None
    }
}

/// A routine, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutineRec {
    /// Random: the routine's placement and its fires' request ids derive from it.
    pub id: String,
    /// The host whose routine it is (it sends the mail).
    pub host: String,
    pub name: String,
    /// The recipient: a path in the host's names.
    pub to: String,
    pub schedule: Schedule,
    pub text: String,
    pub created_ms: u64,
    /// The last tick fired (or, before the first, the tick before it was added).
    pub last_tick_ms: u64,
    /// Ticks fired.
    pub fired: u64,
    /// Why the last tick could not be delivered (empty when it was).
    pub last_error: String,
    /// In a cluster, the node that fires it (read from its placement by
    /// `routine list`; not stored).
    #[serde(default, skip_serializing)]
    pub owner: Option<String>,
}

impl RoutineRec {
    fn formula(&self) -> Result<FormulaId, Error> {
        self.id
            .parse()
            .map_err(|_| Error::Corrupt("routine id".into()))
    }

    /// The routine as `routine list --json` shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let (every_ms, cron) = match &self.schedule {
            Schedule::Every { ms } => (Some(*ms), None),
            Schedule::Cron { expr } => (None, Some(expr.clone())),
        };
        serde_json::json!({
            "name": self.name,
            "id": self.id,
            "to": self.to,
            "schedule": self.schedule.describe(),
            "every_ms": every_ms,
            "cron": cron,
            "text": self.text,
            "created_ms": self.created_ms,
            "last_tick_ms": self.last_tick_ms,
            "next_ms": self.schedule.next_after(self.last_tick_ms.max(now_ms())),
            "fired": self.fired,
            "last_error": self.last_error,
            "owner": self.owner,
        })
    }
}

fn decode(b: &[u8]) -> Result<RoutineRec, Error> {
    serde_json::from_slice(b).map_err(|e| Error::Corrupt(format!("routine record: {e}")))
}

/// The request id of the fire of `id` at `tick_ms`.
pub fn fire_request(id: &FormulaId, tick_ms: u64) -> RequestId {
    let mut h = blake3::Hasher::new_derive_key("capstan routine fire v1");
    h.update(id.as_bytes());
    h.update(&tick_ms.to_be_bytes());
    let mut r = [0u8; 16];
    r.copy_from_slice(&h.finalize().as_bytes()[..16]);
    RequestId(r)
}

/// The text a fire mails: the tick, then the routine's text.
pub fn fire_text(name: &str, tick_ms: u64, text: &str) -> String {
    format!("[routine {name} tick {}] {text}", utc_text(tick_ms))
}

impl AgentHandle {
    /// Adds routine `name` of this host: mail `text` to `to` on `schedule`.
    /// Retried with the same `req`, it answers the routine it made.
    pub async fn routine_add(
        &self,
        req: RequestId,
        name: &str,
        to: &str,
        schedule: Schedule,
        text: &str,
    ) -> Result<RoutineRec, Error> {
        if !self.ctx.is_host {
            return Err(Error::Invalid("only a host can have routines".into()));
        }
        if !crate::names::is_pet_name(name) {
            return Err(Error::InvalidName(name.to_string()));
        }
        if text.trim().is_empty() {
            return Err(Error::Invalid("a routine needs a --text to mail".into()));
        }
        if text.len() > MAX_ROUTINE_TEXT {
            return Err(Error::TooLarge {
                what: "routine text".into(),
                len: text.len(),
                max: MAX_ROUTINE_TEXT,
            });
        }
        let target = self.show(to).await?;
        if !matches!(target.kind.as_str(), "host" | "guest" | "remote") {
            return Err(Error::WrongType {
                name: to.to_string(),
                expected: "agent".into(),
                actual: target.kind,
            });
        }
        // The id is derived from the request: a retry makes the same one.
        let mut h = blake3::Hasher::new_derive_key("capstan routine id v1");
        h.update(self.ctx.id.as_bytes());
        h.update(&req.0);
        let id = FormulaId::from_slice(&h.finalize().as_bytes()[..32])
            .map_err(|e| Error::Corrupt(format!("routine id: {e}")))?;
        let now = now_ms();
        let rec = RoutineRec {
            id: id.to_hex(),
            host: self.ctx.id.to_hex(),
            name: name.to_string(),
            to: to.to_string(),
            last_tick_ms: schedule.latest_due(0, now).unwrap_or(now),
            schedule,
            text: text.to_string(),
            created_ms: now,
            fired: 0,
            last_error: String::new(),
            owner: None,
        };
        let host = self.ctx.id;
        let name = name.to_string();
        self.rt
            .db
            .transact(move |tx| {
                let (rec, name) = (rec.clone(), name.clone());
                Box::pin(async move {
                    if let Some(b) = tx.get(&rec_key(&id)).await? {
                        return decode(&b); // a retry
                    }
                    if tx.get(&name_key(&host, &name)).await?.is_some() {
                        return Err(Error::Invalid(format!(
                            "routine {name:?} exists already; remove it first (`capstan routine remove {name}`)"
                        )));
                    }
                    let n = tx
                        .get_prefix(&names_prefix(&host), MAX_ROUTINES_PER_HOST + 1, false)
                        .await?
                        .len();
                    if n >= MAX_ROUTINES_PER_HOST {
                        return Err(Error::Invalid(format!(
                            "this host has {n} routines, the most it may have ({MAX_ROUTINES_PER_HOST}); remove one first"
                        )));
                    }
                    tx.set(&name_key(&host, &name), id.as_bytes())?;
                    tx.set(
                        &rec_key(&id),
                        &serde_json::to_vec(&rec).expect("routine serialises"),
                    )?;
                    Ok(rec)
                })
            })
            .await
    }

    /// This host's routines, by name.
    pub async fn routine_list(&self) -> Result<Vec<RoutineRec>, Error> {
        let host = self.ctx.id;
        self.rt
            .db
            .read(move |tx| {
                Box::pin(async move {
                    let rows = tx
                        .get_prefix(&names_prefix(&host), MAX_ROUTINES_PER_HOST + 1, false)
                        .await?;
                    let mut out = Vec::with_capacity(rows.len());
                    for (_, v) in rows {
                        let id = FormulaId::from_slice(&v)
                            .map_err(|_| Error::Corrupt("routine id".into()))?;
                        if let Some(b) = tx.get(&rec_key(&id)).await? {
                            let mut r = decode(&b)?;
                            r.owner = crate::cluster::get_placement(tx, &id)
                                .await?
                                .map(|p| p.node);
                            out.push(r);
                        }
                    }
                    Ok(out)
                })
            })
            .await
    }

    /// Removes routine `name`: no tick fires after this returns.
    pub async fn routine_remove(&self, name: &str) -> Result<(), Error> {
        let host = self.ctx.id;
        let name = name.to_string();
        self.rt
            .db
            .transact(move |tx| {
                let name = name.clone();
                Box::pin(async move {
                    let Some(v) = tx.get(&name_key(&host, &name)).await? else {
                        return Err(Error::Invalid(format!(
                            "no routine {name:?}; see `capstan routine list`"
                        )));
                    };
                    let id = FormulaId::from_slice(&v)
                        .map_err(|_| Error::Corrupt("routine id".into()))?;
                    tx.clear(&name_key(&host, &name));
                    tx.clear(&rec_key(&id));
                    crate::cluster::clear_placement(tx, &id);
                    Ok(())
                })
            })
            .await
    }
}

/// Every routine (at most [`MAX_ROUTINES`]).
async fn list_all(rt: &Arc<Inner>) -> Result<Vec<RoutineRec>, Error> {
    let mut out = Vec::new();
    let mut begin = recs_prefix();
    let end = capstan_cluster::tuple::prefix_end(&begin);
    loop {
        let (b, e) = (begin.clone(), end.clone());
        let rows = rt
            .db
            .read(move |tx| {
                let (b, e) = (b.clone(), e.clone());
                Box::pin(async move {
                    Ok::<_, Error>(
                        tx.get_range(capstan_cluster::RangeOption {
                            begin: b,
                            end: e,
                            limit: PAGE,
                            reverse: false,
                        })
                        .await?,
                    )
                })
            })
            .await?;
        let full = rows.len() == PAGE;
        let last = rows.last().map(|(k, _)| k.clone());
        for (_, v) in rows {
            match decode(&v) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!("skipping a routine: {e}"),
            }
        }
        match last {
            Some(mut k) if full && out.len() < MAX_ROUTINES => {
                k.push(0);
                begin = k;
            }
            _ => return Ok(out),
        }
    }
}

/// Whether this node fires routine `id` now: a lone node fires all; in a
/// cluster, only the owner of the routine's placement (claimed if it has
/// none, or a dead one).
async fn fires_here(rt: &Arc<Inner>, id: FormulaId) -> Result<bool, Error> {
    let Some(c) = rt.cluster.get() else {
        return Ok(true);
    };
    let live = c.members();
    let mut owner = c.owner(&rt.db, id).await?;
    if let crate::cluster::Owner::Other(m) = &owner
        && !live.iter().any(|l| l.name == m.name && l.epoch == m.epoch)
    {
        // a cached owner that died since: ask the store again
        c.forget_owner(&id);
        owner = c.owner(&rt.db, id).await?;
    }
    Ok(owner == crate::cluster::Owner::Me)
}

/// Whether an error of a fire is worth trying again (the store or the
/// cluster was unavailable) rather than giving the tick up.
fn transient(e: &Error) -> bool {
    matches!(
        e,
        Error::Store(_) | Error::Unavailable(_) | Error::Fenced(_)
    )
}

/// Fires `r` for tick `tick` (if it is still there) and records it.
async fn fire(rt: &Arc<Inner>, r: &RoutineRec, tick: u64) -> Result<(), Error> {
    let id = r.formula()?;
    let host: FormulaId = r
        .host
        .parse()
        .map_err(|_| Error::Corrupt("routine host".into()))?;
    let sent = async {
        let h = AgentHandle::load(rt, host).await?;
        h.send_while(
            fire_request(&id, tick),
            &r.to,
            fire_text(&r.name, tick, &r.text),
            rec_key(&id),
        )
        .await
    }
    .await;
    let error = match sent {
        Ok(_) => String::new(),
        Err(e) if transient(&e) => return Err(e),
        Err(Error::Invalid(m)) if m == "the routine was removed" => return Ok(()),
        Err(e) => {
            tracing::warn!(routine = %r.name, tick, "routine tick not delivered: {e}");
            e.to_string()
        }
    };
    rt.db
        .transact(move |tx| {
            let error = error.clone();
            Box::pin(async move {
                let Some(b) = tx.get(&rec_key(&id)).await? else {
                    return Ok(());
                };
                let mut rec = decode(&b)?;
                if rec.last_tick_ms >= tick {
                    return Ok(()); // fired already (by another node)
                }
                rec.last_tick_ms = tick;
                rec.fired += u64::from(error.is_empty());
                rec.last_error = error;
                tx.set(
                    &rec_key(&id),
                    &serde_json::to_vec(&rec).expect("routine serialises"),
                )?;
                Ok::<_, Error>(())
            })
        })
        .await
}

/// The routines as last read from the store, and when: the poller looks
/// at them every [`POLL`] but reads them again only every [`REFRESH`] (or
/// after a look that fired something). A tick computed from a copy that is
/// a little old is safe: a fire checks the routine still exists in its own
/// transaction and is answered once per tick (module docs).
#[derive(Default)]
struct Known {
    routines: Vec<RoutineRec>,
    read_at: Option<tokio::time::Instant>,
}

/// One look: fires every routine that is due and owned here.
async fn fire_due(rt: &Arc<Inner>, known: &mut Known) -> Result<usize, Error> {
    let stale = known.read_at.is_none_or(|at| at.elapsed() >= REFRESH);
    if stale {
        known.routines = list_all(rt).await?;
        known.read_at = Some(tokio::time::Instant::now());
    }
    let mut fired = 0;
    for r in &known.routines {
        let now = now_ms();
        let Some(tick) = r.schedule.latest_due(r.last_tick_ms, now) else {
            continue;
        };
        let Ok(id) = r.formula() else { continue };
        match fires_here(rt, id).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::debug!(routine = %r.name, "cannot tell who fires it: {e}");
                continue;
            }
        }
        match fire(rt, r, tick).await {
            Ok(()) => fired += 1,
            Err(e) => tracing::warn!(routine = %r.name, tick, "routine fire failed (retried): {e}"),
        }
    }
    if fired > 0 {
        // their last ticks changed: read them again at the next look
        known.read_at = None;
    }
    Ok(fired)
}

/// Fires routines until the runtime is dropped or closed.
pub(crate) async fn routine_loop(rt: std::sync::Weak<Inner>) {
    let mut failures = 0u32;
    let mut known = Known::default();
    loop {
        let Some(inner) = rt.upgrade() else { return };
        if inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        match fire_due(&inner, &mut known).await {
            Ok(_) => failures = 0,
            Err(e) => {
                known.read_at = None;
                failures += 1;
                if failures == 1 || failures.is_multiple_of(50) {
                    tracing::warn!("looking for routines that are due: {e}");
                }
            }
        }
        drop(inner);
        tokio::time::sleep(POLL).await;
    }
}

impl Runtime {
    /// Fires routines that are due (see [`crate::routines`]): on a lone
    /// node all of them, in a cluster those this node owns. Call once,
    /// inside tokio, after [`Runtime::join_cluster`].
    pub fn start_routines(&self) {
        tokio::spawn(routine_loop(Arc::downgrade(self.inner())));
    }
}

#[cfg(test)]
mod tests;
