//! Who owns a formula in a cluster: the placement decisions, apart from
//! the store they are read from and written to.
//!
//! A formula's placement names a node and the epoch it had when it claimed
//! the formula. The placement stands while that node is live under that
//! epoch and not draining; otherwise the next node that needs the formula
//! claims it — if its own lease holds in the store — and a draining node
//! points to a live member that is not draining instead of claiming.
//!
//! The shell (`cluster::placement`, inside one store transaction) reads the
//! placement, then only what the decision needs next: the holder's member
//! record, the members (a draining node), or its own record (a claim), and
//! asks these functions. Time comes in as `now_ms`.

/// A member record, as the decisions need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    pub name: &'a str,
    pub epoch: u64,
    /// Until when its lease holds (ms since the epoch, the store's clock).
    pub expires_ms: u64,
    pub draining: bool,
}

impl Member<'_> {
    /// Whether its lease holds at `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        now_ms <= self.expires_ms
    }
}

/// The node deciding: its name, epoch, and whether it is draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Me<'a> {
    pub name: &'a str,
    pub epoch: u64,
    pub draining: bool,
}

/// A standing placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stands {
    /// This node holds it (this epoch) and keeps it.
    Mine,
    /// Another node holds it: send the work there.
    Theirs,
}

/// Whether the placement on `node` at `epoch` stands, for `me` at
/// `now_ms`; `holder`: that node's member record when it is another node
/// (None: gone). None: nobody holds it for good, it is to be placed anew.
pub fn stands(
    me: &Me,
    (node, epoch): (&str, u64),
    holder: Option<&Member>,
    now_ms: u64,
) -> Option<Stands> {
    if node == me.name {
        return (epoch == me.epoch && !me.draining).then_some(Stands::Mine);
    }
    let h = holder?;
    (h.name == node && h.epoch == epoch && h.live(now_ms) && !h.draining).then_some(Stands::Theirs)
}

/// Where a draining node sends work it does not hold: the index in
/// `members` of the first live member, other than itself, that is not
/// draining (None: there is none, and the work cannot be taken anywhere
/// now).
pub fn hand_off(me: &str, members: &[Member], now_ms: u64) -> Option<usize> {
    members
        .iter()
        .position(|m| m.name != me && m.live(now_ms) && !m.draining)
}

/// Where a formula goes when the cluster spreads its work
/// ([`Policy::Spread`]): the index in `members` of the live member, not
/// draining, that scores highest for `formula` (rendezvous hashing: each
/// member's score is a hash of its name and the formula's id). Every node
/// that sees the same members picks the same one; a member joining takes
/// only the formulas it now scores highest for (about 1/N of them), and one
/// leaving gives up only its own. None: no member can take it.
pub fn winner(formula: &[u8], members: &[Member], now_ms: u64) -> Option<usize> {
    members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.live(now_ms) && !m.draining)
        .max_by_key(|(_, m)| (score(formula, m.name), m.name))
        .map(|(i, _)| i)
}

/// Of the placements `held` (formula id, holder, holder's epoch), those
/// `me` at `epoch` holds and another of `members` wins: what a node hands
/// over under [`Policy::Spread`]. `members` are the ones live when the
/// node last listed them, and count as live here whatever their recorded
/// expiry says now (a listing is up to a second old: judged against the
/// clock now, the node took members, itself included, for dead, and
/// handed over what it still won, to claim it back at the next call).
pub fn to_hand_over<'a, Id: AsRef<[u8]>>(
    held: impl IntoIterator<Item = (Id, &'a str, u64)>,
    members: &[Member],
    me: &str,
    epoch: u64,
) -> Vec<Id> {
    held.into_iter()
        .filter(|(id, node, e)| {
            *node == me
                && *e == epoch
                && winner(id.as_ref(), members, 0).is_some_and(|i| members[i].name != me)
        })
        .map(|(id, _, _)| id)
        .collect()
}

/// A member's rendezvous score for a formula.
fn score(formula: &[u8], member: &str) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("capstan 2026 placement score");
    h.update(&(member.len() as u64).to_le_bytes());
    h.update(member.as_bytes());
    h.update(formula);
    let mut out = [0u8; 8];
    h.finalize_xof().fill(&mut out);
    u64::from_le_bytes(out)
}

/// How a cluster places formulas nobody holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// On the node that first needs it (its clients' node: no hop between
    /// nodes for their calls). The default.
    #[default]
    Local,
    /// On the member [`winner`] picks, and moved there when members join
    /// or leave: the work of agents created through one node is spread
    /// over all of them.
    Spread,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Local => "local",
            Policy::Spread => "spread",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "local" => Ok(Policy::Local),
            "spread" => Ok(Policy::Spread),
            other => Err(format!(
                "unknown placement policy {other:?}: local (on the node that first needs it) or spread (over every live node)"
            )),
        }
    }
}

/// Whether `me` may claim a formula: its own member record in the store
/// (`mine`) is of its epoch and live — a node whose lease lapsed in the
/// store claims nothing, even if its clock says otherwise.
pub fn may_claim(me: &Me, mine: Option<&Member>, now_ms: u64) -> bool {
    mine.is_some_and(|m| m.epoch == me.epoch && m.live(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn member(name: &str, epoch: u64) -> Member<'_> {
        Member {
            name,
            epoch,
            expires_ms: NOW + 500,
            draining: false,
        }
    }

    const ME: Me<'static> = Me {
        name: "n1",
        epoch: 4,
        draining: false,
    };

    #[test]
    fn a_placement_on_this_node_stands_only_for_its_epoch_and_while_it_is_not_draining() {
        assert_eq!(stands(&ME, ("n1", 4), None, NOW), Some(Stands::Mine));
        // claimed by this node's earlier run: placed anew (taken over)
        assert_eq!(stands(&ME, ("n1", 3), None, NOW), None);
        let draining = Me {
            draining: true,
            ..ME
        };
        assert_eq!(stands(&draining, ("n1", 4), None, NOW), None);
    }

    #[test]
    fn another_nodes_placement_stands_while_it_is_live_under_that_epoch_and_not_draining() {
        let n2 = member("n2", 7);
        assert_eq!(stands(&ME, ("n2", 7), Some(&n2), NOW), Some(Stands::Theirs));
        assert_eq!(
            stands(&ME, ("n2", 7), None, NOW),
            None,
            "its record is gone"
        );
        assert_eq!(
            stands(&ME, ("n2", 6), Some(&n2), NOW),
            None,
            "it registered again since: its old placements are void"
        );
        let dead = Member {
            expires_ms: NOW - 1,
            ..n2
        };
        assert_eq!(stands(&ME, ("n2", 7), Some(&dead), NOW), None);
        assert_eq!(
            stands(&ME, ("n2", 7), Some(&n2), NOW + 500),
            Some(Stands::Theirs),
            "live up to its expiry"
        );
        let draining = Member {
            draining: true,
            ..n2
        };
        assert_eq!(stands(&ME, ("n2", 7), Some(&draining), NOW), None);
        // a record of another node is no proof for this one
        assert_eq!(stands(&ME, ("n2", 7), Some(&member("n3", 7)), NOW), None);
    }

    #[test]
    fn a_draining_node_hands_work_to_a_live_member_that_is_not_draining() {
        let members = [
            member("n1", 4),
            Member {
                draining: true,
                ..member("n2", 1)
            },
            Member {
                expires_ms: NOW - 1,
                ..member("n3", 1)
            },
            member("n4", 2),
        ];
        assert_eq!(hand_off("n1", &members, NOW), Some(3));
        assert_eq!(
            hand_off("n1", &members[..3], NOW),
            None,
            "nobody can take it"
        );
    }

    #[test]
    fn spreading_picks_one_live_member_every_node_agrees_on_and_moves_little() {
        let names: Vec<String> = (1..=6).map(|i| format!("n{i}")).collect();
        let all: Vec<Member> = names.iter().map(|n| member(n, 1)).collect();
        let ids: Vec<[u8; 32]> = (0..3000u32)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect();
        fn pick<'a>(ms: &[Member<'a>], id: &[u8; 32]) -> Option<&'a str> {
            winner(id, ms, NOW).map(|i| ms[i].name)
        }
        // the same members in another order: the same pick
        let mut shuffled = all.clone();
        shuffled.reverse();
        shuffled.swap(1, 4);
        let mut per_node = std::collections::HashMap::new();
        for id in &ids {
            let w = pick(&all, id).unwrap();
            assert_eq!(pick(&shuffled, id), Some(w));
            *per_node.entry(w).or_insert(0) += 1;
        }
        // spread: each of 6 members gets about 500 of 3000
        assert_eq!(per_node.len(), 6);
        assert!(
            per_node.values().all(|&n| (350..650).contains(&n)),
            "{per_node:?}"
        );
        // a member leaving (dead or draining) moves only its own formulas
        for gone in [
            Member {
                expires_ms: NOW - 1,
                ..all[2]
            },
            Member {
                draining: true,
                ..all[2]
            },
        ] {
            let mut fewer = all.clone();
            fewer[2] = gone;
            for id in &ids {
                let (before, after) = (pick(&all, id).unwrap(), pick(&fewer, id).unwrap());
                assert_ne!(after, "n3");
                if before != "n3" {
                    assert_eq!(after, before, "a formula of another member moved");
                }
            }
        }
        // nobody live: nowhere
        let dead: Vec<Member> = all
            .iter()
            .map(|m| Member {
                expires_ms: NOW - 1,
                ..*m
            })
            .collect();
        assert_eq!(winner(&ids[0], &dead, NOW), None);
        assert_eq!(winner(&ids[0], &[], NOW), None);
    }

    #[test]
    fn a_node_hands_over_only_what_another_member_of_its_listing_wins() {
        let ids: Vec<[u8; 32]> = (0..300u32)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect();
        // listed a while ago: every expiry is long past by the clock now
        let old = |name| Member {
            expires_ms: 5,
            ..member(name, 1)
        };
        let two = [old("n1"), old("n2")];
        let three = [old("n1"), old("n2"), old("n3")];
        let held = |epoch| {
            ids.iter()
                .map(move |id| (id.as_slice(), "n1", epoch))
                .collect::<Vec<_>>()
        };
        // n1 holds all: with n2 it keeps what it wins (about half)...
        let out = to_hand_over(held(1), &two, "n1", 1);
        assert!((100..200).contains(&out.len()), "{}", out.len());
        for id in &out {
            assert_eq!(two[winner(id, &two, 0).unwrap()].name, "n2");
        }
        // ...and with n3 joined, also what n3 wins, and nothing it still wins
        let more = to_hand_over(held(1), &three, "n1", 1);
        assert!(more.len() > out.len());
        for id in &more {
            assert_ne!(three[winner(id, &three, 0).unwrap()].name, "n1");
        }
        // its own record older than n2's: the same (it once handed over
        // all it held, counting itself dead)
        let mixed = [old("n1"), member("n2", 1)];
        assert_eq!(to_hand_over(held(1), &mixed, "n1", 1), out);
        // only its own placements of this epoch
        assert!(to_hand_over(held(2), &three, "n1", 1).is_empty());
        assert!(to_hand_over(held(1), &three, "n2", 1).is_empty());
        // alone in its listing, it keeps everything
        assert!(to_hand_over(held(1), &three[..1], "n1", 1).is_empty());
    }

    #[test]
    fn placement_policies_parse_by_name() {
        for p in [Policy::Local, Policy::Spread] {
            assert_eq!(p.name().parse::<Policy>(), Ok(p));
        }
        assert!(
            "round-robin"
                .parse::<Policy>()
                .unwrap_err()
                .contains("local")
        );
        assert_eq!(Policy::default(), Policy::Local);
    }

    #[test]
    fn a_node_claims_only_while_its_own_record_is_live_under_its_epoch() {
        assert!(may_claim(&ME, Some(&member("n1", 4)), NOW));
        assert!(!may_claim(&ME, None, NOW));
        assert!(!may_claim(&ME, Some(&member("n1", 5)), NOW));
        let lapsed = Member {
            expires_ms: NOW - 1,
            ..member("n1", 4)
        };
        assert!(!may_claim(&ME, Some(&lapsed), NOW));
    }
}
