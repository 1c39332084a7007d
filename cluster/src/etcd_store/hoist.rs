//! Compares that several members of one Txn make, checked once.
//!
//! Concurrent commits read many of the same keys: every send of an agent
//! checks its own inbox mark, every send to one recipient checks that
//! recipient's mark (and, when the recipient was resolved on a recent
//! snapshot, its two keys): up to four of a send's seven compares. In a
//! batch each member's nested Txn checked them again, and etcd reads the
//! key's current version for every compare, in every member. [`hoist`]
//! gathers members that share compares under one more nested Txn that
//! checks them once (measured with `capstan bench --cluster`, 3 nodes: 7
//! compares per send became 3.4–3.5, etcd CPU per send 5–30 µs less, of
//! about 210; a compare costs a member less than a put):
//!
//! ```text
//! Txn{compare: shared, success: [Txn{compare: c1 - shared, success: w1},
//!                                Txn{compare: c2 - shared, success: w2}, …]}
//! ```
//!
//! Etcd decides every Txn's branch on the state before the outermost Txn, so
//! a member applies exactly when the shared compares and its own hold: as it
//! would checking them all itself. When a shared compare fails, every member
//! of the gathering fails, as each would have alone, and [`answers`] gives
//! each the answer of a failed compare. A member with a failure branch is
//! never gathered (a failed shared compare would skip it).
//!
//! Gatherings are chosen greedily: the compare whose makers share the most
//! compares between them (makers less one, times compares in common)
//! first, then again among the members left; within a gathering, once
//! more, on what its members do not share (two levels: the compare every
//! send of one agent makes, then each recipient's). A level costs etcd a
//! nested Txn (cheap beside a compare, which reads its key's current
//! version) and the operations budget (`--max-txn-ops`) that etcd checks a
//! nested Txn against ([`need`]): a plan that would not fit that budget is
//! made with one level, or none.

use rustc_hash::FxHashMap;

use crate::etcd_rpc::{Compare, Request, RequestOp, Response, ResponseOp, TxnRequest, TxnResponse};

/// Most levels of gatherings.
pub(super) const LEVELS: usize = 2;

/// Where each member's answer is in the answers to the operations [`hoist`]
/// made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Layout {
    slots: Vec<Slot>,
    members: usize,
    /// Compares of the members checked by a gathering instead of by each.
    saved: usize,
}

impl Layout {
    /// The members laid out.
    pub(super) fn members(&self) -> usize {
        self.members
    }

    /// Compares the members would check that a gathering checks once
    /// for them (each member's less one per gathered compare).
    pub(super) fn saved(&self) -> usize {
        self.saved
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    /// One member's nested Txn.
    One(usize),
    /// A Txn that checks shared compares, over these.
    Shared(Vec<Slot>),
}

/// The operations budget `t` needs from etcd: its most compares or
/// operations of a branch, plus what its widest nested Txn needs (etcd
/// checks a nested Txn against what its parents left of `--max-txn-ops`).
pub(super) fn need(t: &TxnRequest) -> usize {
    own_need(t, t.compare.len())
}

/// The compares `op` makes etcd check, nested Txns' included.
fn compares_in(op: &RequestOp) -> usize {
    match &op.request {
        Some(Request::Txn(t)) => {
            t.compare.len()
                + t.success
                    .iter()
                    .chain(&t.failure)
                    .map(compares_in)
                    .sum::<usize>()
        }
        _ => 0,
    }
}

/// [`need`] of `t` were its compares `compares` many.
fn own_need(t: &TxnRequest, compares: usize) -> usize {
    let own = compares.max(t.success.len()).max(t.failure.len());
    own + t
        .success
        .iter()
        .chain(&t.failure)
        .map(|op| match &op.request {
            Some(Request::Txn(n)) => need(n),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// The members' Txns as operations of one parent Txn, members that share
/// compares gathered under Txns that check them once (module docs), and
/// where each member's answer will be. `around`: the parent's other
/// operations (markers, guard); `budget`: the most operations the parent
/// may need ([`need`]). The members' order is kept, a gathering in its
/// first member's place; when no gathering fits the budget, each member is
/// an operation of its own, as given.
pub(super) fn hoist(
    members: Vec<TxnRequest>,
    around: usize,
    budget: usize,
) -> (Vec<RequestOp>, Layout) {
    let n = members.len();
    let interned = Interned::new(&members);
    for levels in (1..=LEVELS).rev() {
        if interned.table.is_empty() {
            break;
        }
        let mut planner = Planner::new(&members, &interned);
        let plans = planner.plan((0..n).collect(), levels);
        if plans.iter().all(|p| matches!(p, Plan::One(_))) {
            break;
        }
        let widest = plans.iter().map(|p| planner.need(p)).max().unwrap_or(0);
        // (the parent's own compares, its marker's, are fewer than its operations)
        if plans.len() + around + widest > budget {
            continue;
        }
        let before: usize = members.iter().map(|t| t.compare.len()).sum();
        let live = planner.live;
        // the shared compares, owned (the members are taken apart next)
        let plans: Vec<Plan<Compare>> = plans
            .into_iter()
            .map(|p| p.owned(&interned.table))
            .collect();
        let mut taken: Vec<Option<TxnRequest>> = members.into_iter().map(Some).collect();
        let mut ops = Vec::with_capacity(plans.len());
        let mut slots = Vec::with_capacity(plans.len());
        for p in plans {
            let (op, slot) = build(p, &mut taken, &live);
            ops.push(op);
            slots.push(slot);
        }
        let saved = before.saturating_sub(ops.iter().map(compares_in).sum());
        return (
            ops,
            Layout {
                slots,
                members: n,
                saved,
            },
        );
    }
    as_given(members)
}

/// The members' Txns as operations of one parent Txn, each as given.
pub(super) fn as_given(members: Vec<TxnRequest>) -> (Vec<RequestOp>, Layout) {
    let n = members.len();
    (
        members.into_iter().map(RequestOp::txn).collect(),
        Layout {
            slots: (0..n).map(Slot::One).collect(),
            members: n,
            saved: 0,
        },
    )
}

/// A plan of gatherings: a member, or shared compares (while planning, by
/// their number in [`Interned::table`]) over plans.
enum Plan<C = u32> {
    One(usize),
    Shared(Vec<C>, Vec<Plan<C>>),
}

impl Plan<u32> {
    /// The plan with its compares themselves.
    fn owned(self, table: &[&Compare]) -> Plan<Compare> {
        match self {
            Plan::One(i) => Plan::One(i),
            Plan::Shared(common, plans) => Plan::Shared(
                common.iter().map(|&c| table[c as usize].clone()).collect(),
                plans.into_iter().map(|p| p.owned(table)).collect(),
            ),
        }
    }
}

/// The operation and slot of `p`, taking its members from `taken` and
/// leaving out of each the compares checked above it (`live[i][k]` false).
fn build(
    p: Plan<Compare>,
    taken: &mut [Option<TxnRequest>],
    live: &[Vec<bool>],
) -> (RequestOp, Slot) {
    match p {
        Plan::One(i) => {
            let mut t = taken[i].take().unwrap_or_default();
            let mut k = 0;
            t.compare.retain(|_| {
                k += 1;
                live[i][k - 1]
            });
            (RequestOp::txn(t), Slot::One(i))
        }
        Plan::Shared(compare, plans) => {
            let (success, slots) = plans.into_iter().map(|p| build(p, taken, live)).unzip();
            let t = TxnRequest {
                compare,
                success,
                failure: Vec::new(),
            };
            (RequestOp::txn(t), Slot::Shared(slots))
        }
    }
}

/// The members' compares that two or more of them make, numbered (each
/// distinct compare hashed once, with a fast hash: a compare's key is tens
/// of bytes, and planning looks at each many times). A compare of a member with a
/// failure branch, or of one member only, has no number ([`ALONE`]).
struct Interned<'a> {
    /// The shared compares, by number.
    table: Vec<&'a Compare>,
    /// Each member's compares' numbers, in its order.
    ids: Vec<Vec<u32>>,
}

/// The number of a compare no other member makes.
const ALONE: u32 = u32::MAX;

impl<'a> Interned<'a> {
    fn new(members: &'a [TxnRequest]) -> Self {
        // every distinct compare, and how many members (that may be
        // gathered) make it
        let total = members.iter().map(|t| t.compare.len()).sum();
        let mut number: FxHashMap<&Compare, u32> =
            FxHashMap::with_capacity_and_hasher(total, Default::default());
        let mut all: Vec<(&Compare, usize, usize)> = Vec::with_capacity(total);
        let ids: Vec<Vec<u32>> = members
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.compare
                    .iter()
                    .map(|c| {
                        let id = *number.entry(c).or_insert_with(|| {
                            all.push((c, 0, usize::MAX));
                            (all.len() - 1) as u32
                        });
                        let (_, makers, last) = &mut all[id as usize];
                        if t.failure.is_empty() && *last != i {
                            *last = i;
                            *makers += 1;
                        }
                        id
                    })
                    .collect()
            })
            .collect();
        let mut table = Vec::new();
        let dense: Vec<u32> = all
            .iter()
            .map(|(c, makers, _)| {
                if *makers > 1 {
                    table.push(*c);
                    (table.len() - 1) as u32
                } else {
                    ALONE
                }
            })
            .collect();
        let ids = ids
            .into_iter()
            .map(|m| m.into_iter().map(|id| dense[id as usize]).collect())
            .collect();
        Interned { table, ids }
    }
}

struct Planner<'a> {
    members: &'a [TxnRequest],
    ids: &'a [Vec<u32>],
    compares: usize,
    /// Whether each compare of each member is still its own to check (not
    /// checked by a gathering above it).
    live: Vec<Vec<bool>>,
}

impl<'a> Planner<'a> {
    fn new(members: &'a [TxnRequest], interned: &'a Interned<'a>) -> Self {
        Planner {
            members,
            ids: &interned.ids,
            compares: interned.table.len(),
            live: members
                .iter()
                .map(|t| vec![true; t.compare.len()])
                .collect(),
        }
    }

    /// The numbers of member `i`'s shared compares it still checks itself.
    fn live_ids(&self, i: usize) -> impl Iterator<Item = u32> + '_ {
        self.ids[i]
            .iter()
            .zip(&self.live[i])
            .filter(|(c, l)| **l && **c != ALONE)
            .map(|(c, _)| *c)
    }

    /// The plans of the members `ids` (ascending), gatherings `levels` deep
    /// at most, in their first member's order.
    fn plan(&mut self, ids: Vec<usize>, levels: usize) -> Vec<Plan> {
        let mut free = ids;
        let mut out: Vec<(usize, Plan)> = Vec::new();
        while levels > 0
            && let Some((group, common)) = self.best(&free)
        {
            for &i in &group {
                for (k, c) in self.ids[i].iter().enumerate() {
                    if common.contains(c) {
                        self.live[i][k] = false;
                    }
                }
            }
            free.retain(|i| group.binary_search(i).is_err());
            let first = group[0];
            let inner = self.plan(group, levels - 1);
            out.push((first, Plan::Shared(common, inner)));
        }
        out.extend(free.into_iter().map(|i| (i, Plan::One(i))));
        out.sort_by_key(|(first, _)| *first);
        out.into_iter().map(|(_, p)| p).collect()
    }

    /// The next gathering among `free` (ascending): its members (ascending)
    /// and the compares they all still check, if one saves a compare.
    fn best(&self, free: &[usize]) -> Option<(Vec<usize>, Vec<u32>)> {
        // which free members check each compare (ascending, each once); a
        // member with a failure branch is never gathered
        let mut makers: Vec<Vec<usize>> = vec![Vec::new(); self.compares];
        for &i in free {
            if !self.members[i].failure.is_empty() {
                continue;
            }
            for c in self.live_ids(i) {
                let m = &mut makers[c as usize];
                if m.last() != Some(&i) {
                    m.push(i);
                }
            }
        }
        // in the order the members check them (the choice must not depend
        // on anything but the members: a batch is built again for a renewed
        // lease, and its layout must not change)
        let mut seen = vec![false; self.compares];
        let mut best: Option<(usize, &[usize], Vec<u32>)> = None;
        for &i in free {
            for c in self.live_ids(i) {
                let group = &makers[c as usize];
                if group.len() < 2 || std::mem::replace(&mut seen[c as usize], true) {
                    continue;
                }
                let mut common: Vec<u32> = Vec::new();
                for d in self.live_ids(group[0]) {
                    let m = &makers[d as usize];
                    let all =
                        m.len() >= group.len() && group.iter().all(|j| m.binary_search(j).is_ok());
                    if all && !common.contains(&d) {
                        common.push(d);
                    }
                }
                let saved = (group.len() - 1) * common.len();
                if best.as_ref().is_none_or(|(s, _, _)| saved > *s) {
                    best = Some((saved, group, common));
                }
            }
        }
        best.filter(|(saved, _, _)| *saved > 0)
            .map(|(_, group, common)| (group.to_vec(), common))
    }

    /// The operations budget the Txn of `p` will need.
    fn need(&self, p: &Plan) -> usize {
        match p {
            Plan::One(i) => {
                let live = self.live[*i].iter().filter(|l| **l).count();
                own_need(&self.members[*i], live)
            }
            Plan::Shared(common, plans) => {
                common.len().max(plans.len())
                    + plans.iter().map(|p| self.need(p)).max().unwrap_or(0)
            }
        }
    }
}

/// Each member's answer (in the members' order) from the answers to the
/// operations of `layout`, or `None` for a member whose answer is missing.
/// A gathering whose shared compares failed answers each of its members as
/// a failed compare.
pub(super) fn answers(layout: &Layout, responses: Vec<ResponseOp>) -> Vec<Option<TxnResponse>> {
    let mut out: Vec<Option<TxnResponse>> = vec![None; layout.members];
    for (slot, r) in layout.slots.iter().zip(responses) {
        fill(slot, r, &mut out);
    }
    out
}

fn fill(slot: &Slot, r: ResponseOp, out: &mut [Option<TxnResponse>]) {
    let Some(Response::Txn(t)) = r.response else {
        return;
    };
    match slot {
        Slot::One(i) => out[*i] = Some(t),
        Slot::Shared(slots) if !t.succeeded => failed(slots, out),
        Slot::Shared(slots) => {
            for (s, r) in slots.iter().zip(t.responses) {
                fill(s, r, out);
            }
        }
    }
}

fn failed(slots: &[Slot], out: &mut [Option<TxnResponse>]) {
    for s in slots {
        match s {
            Slot::One(i) => out[*i] = Some(TxnResponse::default()),
            Slot::Shared(slots) => failed(slots, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd_rpc::compare_result;

    fn mark(k: &str, at: i64) -> Compare {
        Compare::mod_revision(k.as_bytes().to_vec(), compare_result::EQUAL, at)
    }

    fn member(compares: &[Compare], put: &str) -> TxnRequest {
        TxnRequest {
            compare: compares.to_vec(),
            success: vec![RequestOp::put(put.as_bytes().to_vec(), b"v".to_vec(), 0)],
            failure: Vec::new(),
        }
    }

    /// Each member as etcd will check it: the compares on its path (its
    /// gatherings' and its own) and its operations; and the compares etcd
    /// checks in all.
    fn as_checked(ops: &[RequestOp], layout: &Layout) -> (Vec<(Vec<Compare>, TxnRequest)>, usize) {
        fn walk(
            op: &RequestOp,
            slot: &Slot,
            above: &[Compare],
            out: &mut Vec<Option<(Vec<Compare>, TxnRequest)>>,
            checked: &mut usize,
        ) {
            let Some(Request::Txn(t)) = &op.request else {
                panic!("every slot is a Txn");
            };
            *checked += t.compare.len();
            let mut path = above.to_vec();
            path.extend(t.compare.iter().cloned());
            match slot {
                Slot::One(i) => out[*i] = Some((path, t.clone())),
                Slot::Shared(slots) => {
                    assert_eq!(slots.len(), t.success.len());
                    for (op, s) in t.success.iter().zip(slots) {
                        walk(op, s, &path, out, checked);
                    }
                }
            }
        }
        let mut out = vec![None; layout.members];
        let mut checked = 0;
        assert_eq!(ops.len(), layout.slots.len());
        for (op, s) in ops.iter().zip(&layout.slots) {
            walk(op, s, &[], &mut out, &mut checked);
        }
        (
            out.into_iter()
                .map(|m| m.expect("every member placed"))
                .collect(),
            checked,
        )
    }

    fn same_set(a: &[Compare], b: &[Compare]) -> bool {
        a.iter().all(|c| b.contains(c)) && b.iter().all(|c| a.contains(c))
    }

    /// Sends of one agent to two recipients: the agent's mark is checked
    /// once for all, each recipient's once for its senders, and every
    /// member is checked on exactly its own compares.
    #[test]
    fn members_sharing_compares_are_gathered_and_keep_their_compares() {
        let (me, g0, g1) = (mark("me", 5), mark("g0", 7), mark("g1", 9));
        let own = |i: i64| mark(&format!("msg{i}"), 0);
        let members = vec![
            member(&[own(0), me.clone(), g0.clone()], "a"),
            member(&[own(1), me.clone(), g1.clone()], "b"),
            member(&[own(2), me.clone(), g0.clone()], "c"),
            member(&[own(3)], "d"),
            member(&[own(4), me.clone(), g1.clone()], "e"),
            member(&[own(5), me.clone(), g0.clone()], "f"),
        ];
        let (ops, layout) = hoist(members.clone(), 2, 1024);
        use Slot::{One, Shared};
        assert_eq!(
            layout.slots,
            vec![
                Shared(vec![
                    Shared(vec![One(0), One(2), One(5)]),
                    Shared(vec![One(1), One(4)])
                ]),
                One(3)
            ]
        );
        let (checked, compares) = as_checked(&ops, &layout);
        for ((path, t), m) in checked.iter().zip(&members) {
            assert!(
                same_set(path, &m.compare),
                "{path:?} against {:?}",
                m.compare
            );
            assert_eq!(t.success, m.success);
        }
        assert_eq!(compares, 6 + 1 + 2, "16 compares checked as 9");
        assert_eq!(layout.saved(), 16 - 9);

        // Whatever the budget, what is made fits it (or is the members as
        // given, which the batch was picked to fit) and checks each member
        // on exactly its own compares.
        let total = |ops: &[RequestOp]| ops.len() + 2 + ops.iter().map(need_of).max().unwrap_or(0);
        let flat: Vec<RequestOp> = members.iter().cloned().map(RequestOp::txn).collect();
        assert_eq!(total(&ops), 10);
        for budget in 0..12 {
            let (ops, layout) = hoist(members.clone(), 2, budget);
            assert!(total(&ops) <= budget.max(total(&flat)), "budget {budget}");
            if total(&ops) > budget {
                assert_eq!(ops, flat);
            }
            for ((path, _), m) in as_checked(&ops, &layout).0.iter().zip(&members) {
                assert!(same_set(path, &m.compare));
            }
        }
    }

    fn need_of(op: &RequestOp) -> usize {
        match &op.request {
            Some(Request::Txn(t)) => need(t),
            _ => 0,
        }
    }

    #[test]
    fn members_sharing_nothing_or_with_a_failure_branch_stay_as_they_are() {
        let members = vec![
            member(&[mark("x", 1)], "a"),
            member(&[mark("x", 2)], "b"),
            member(&[], "c"),
        ];
        let (ops, layout) = hoist(members.clone(), 2, 1024);
        assert_eq!(layout.slots, (0..3).map(Slot::One).collect::<Vec<_>>());
        assert_eq!(
            ops,
            members.into_iter().map(RequestOp::txn).collect::<Vec<_>>()
        );
        // A member with a failure branch is never gathered (a failed shared
        // compare would skip its failure branch).
        let mut with_failure = member(&[mark("x", 1)], "d");
        with_failure.failure = vec![RequestOp::put(b"f".to_vec(), Vec::new(), 0)];
        let (_, layout) = hoist(vec![member(&[mark("x", 1)], "a"), with_failure], 2, 1024);
        assert_eq!(layout.slots, vec![Slot::One(0), Slot::One(1)]);
    }

    #[test]
    fn answers_reach_each_member() {
        let m = |succeeded: bool| TxnResponse {
            header: None,
            succeeded,
            responses: Vec::new(),
        };
        let op = |t: TxnResponse| ResponseOp {
            response: Some(Response::Txn(t)),
        };
        use Slot::{One, Shared};
        let layout = Layout {
            slots: vec![
                Shared(vec![One(0), Shared(vec![One(2), One(5)])]),
                One(1),
                Shared(vec![One(3), Shared(vec![One(4)])]),
            ],
            members: 6,
            saved: 0,
        };
        let got = answers(
            &layout,
            vec![
                op(TxnResponse {
                    header: None,
                    succeeded: true,
                    responses: vec![
                        op(m(false)),
                        op(TxnResponse {
                            header: None,
                            succeeded: true,
                            responses: vec![op(m(true)), op(m(true))],
                        }),
                    ],
                }),
                op(m(true)),
                // the shared compares failed: none of 3 and 4 ran
                op(m(false)),
            ],
        );
        let succeeded: Vec<Option<bool>> = got
            .iter()
            .map(|a| a.as_ref().map(|t| t.succeeded))
            .collect();
        assert_eq!(
            succeeded,
            vec![
                Some(false),
                Some(true),
                Some(true),
                Some(false),
                Some(false),
                Some(true)
            ]
        );
        // missing answers stay missing
        let got = answers(&layout, vec![op(m(false))]);
        assert!(got[0].is_some() && got[1].is_none() && got[3].is_none());
    }

    /// Random batches over a small key space (so members share compares in
    /// every way): whatever is gathered, each member is checked on exactly
    /// its own compares and keeps its operations, what is made fits the
    /// budget (or is the members as given), the compares saved are counted
    /// right, and a failed gathering fails exactly the members under it.
    #[test]
    fn random_batches_keep_every_member_exactly() {
        let mut next = super::super::test_rng(0x2545_f491_4f6c_dd1d);
        let (mut gathered, mut two_levels) = (0, 0);
        for round in 0..400 {
            let n = 1 + next(24) as usize;
            let members: Vec<TxnRequest> = (0..n)
                .map(|i| {
                    let c = next(6);
                    let mut compares: Vec<Compare> = (0..c)
                        .map(|_| mark(&format!("k{}", next(8)), next(2) as i64))
                        .collect();
                    if next(3) == 0 {
                        compares.push(mark(&format!("own{i}"), 0));
                    }
                    let mut t = member(&compares, &format!("w{i}"));
                    if next(10) == 0 {
                        t.failure = vec![RequestOp::put(b"f".to_vec(), Vec::new(), 0)];
                    }
                    t
                })
                .collect();
            let flat_total = n + 2 + members.iter().map(need).max().unwrap_or(0);
            let budget = if next(4) == 0 {
                flat_total.saturating_sub(next(4) as usize)
            } else {
                1024
            };
            let (ops, layout) = hoist(members.clone(), 2, budget);
            let total = ops.len() + 2 + ops.iter().map(need_of).max().unwrap_or(0);
            if total > budget {
                assert_eq!(
                    ops,
                    members
                        .iter()
                        .cloned()
                        .map(RequestOp::txn)
                        .collect::<Vec<_>>(),
                    "round {round}: over the budget and not as given"
                );
            }
            gathered += usize::from(layout.slots.iter().any(|s| matches!(s, Slot::Shared(_))));
            two_levels += usize::from(layout.slots.iter().any(
                |s| matches!(s, Slot::Shared(inner) if inner.iter().any(|s| matches!(s, Slot::Shared(_)))),
            ));
            let (checked, sent) = as_checked(&ops, &layout);
            let all: usize = members.iter().map(|m| m.compare.len()).sum();
            assert_eq!(sent + layout.saved(), all, "round {round}: saved compares");
            for (i, ((path, t), m)) in checked.iter().zip(&members).enumerate() {
                assert!(same_set(path, &m.compare), "round {round}, member {i}");
                assert_eq!(t.success, m.success, "round {round}, member {i}");
                assert_eq!(t.failure, m.failure, "round {round}, member {i}");
                if !m.failure.is_empty() {
                    assert!(
                        layout.slots.contains(&Slot::One(i)),
                        "round {round}: member {i} has a failure branch and was gathered"
                    );
                }
            }
            // Etcd's answer when every compare holds but the first
            // gathering's: its members fail, every other member applies.
            let mut failed_members = Vec::new();
            let responses: Vec<ResponseOp> = layout
                .slots
                .iter()
                .enumerate()
                .map(|(k, slot)| {
                    fn ok(slot: &Slot) -> ResponseOp {
                        let responses = match slot {
                            Slot::One(_) => Vec::new(),
                            Slot::Shared(slots) => slots.iter().map(ok).collect(),
                        };
                        ResponseOp {
                            response: Some(Response::Txn(TxnResponse {
                                header: None,
                                succeeded: true,
                                responses,
                            })),
                        }
                    }
                    fn leaves(slot: &Slot, out: &mut Vec<usize>) {
                        match slot {
                            Slot::One(i) => out.push(*i),
                            Slot::Shared(slots) => slots.iter().for_each(|s| leaves(s, out)),
                        }
                    }
                    let first_gathering = layout
                        .slots
                        .iter()
                        .position(|s| matches!(s, Slot::Shared(_)));
                    if Some(k) == first_gathering {
                        leaves(slot, &mut failed_members);
                        ResponseOp {
                            response: Some(Response::Txn(TxnResponse::default())),
                        }
                    } else {
                        ok(slot)
                    }
                })
                .collect();
            let got = answers(&layout, responses);
            for (i, a) in got.iter().enumerate() {
                let a = a
                    .as_ref()
                    .unwrap_or_else(|| panic!("round {round}: member {i} unanswered"));
                assert_eq!(
                    a.succeeded,
                    !failed_members.contains(&i),
                    "round {round}, member {i}"
                );
            }
        }
        assert!(
            gathered > 200 && two_levels > 50,
            "{gathered} rounds gathered, {two_levels} two levels deep"
        );
    }
}
