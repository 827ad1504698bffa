//! Where a CouchDB cluster's shard copies should be, worked out from where
//! they are: every range of every database gets the copies the stack asks
//! for (its `n`, else the copies it has) on members that stay, keeping the
//! copies it has where it can; with `rebalance`, copies then move from the
//! busiest members to the idlest until no member holds two more than
//! another. A range that cannot keep its copies on the members left is a
//! problem the plan names. Pure: the database phase turns the difference
//! into shard-map edits (add, let internal replication fill, then drop).

use std::collections::{BTreeMap, BTreeSet};

/// Ranges to the nodes holding a copy, by database.
pub type Layout = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// A range that cannot have the copies it needs on the members left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub database: String,
    pub range: String,
    pub copies: usize,
    pub members: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    pub layout: Layout,
    pub shortfalls: Vec<Shortfall>,
}

/// The layout wanted for `current` on `members`; `copies` gives the copies
/// per range a database must have (`None`: those it has).
pub fn place(
    current: &Layout,
    members: &[String],
    copies: impl Fn(&str) -> Option<usize>,
    rebalance: bool,
) -> Placement {
    let staying: BTreeSet<&String> = members.iter().collect();
    let mut load: BTreeMap<String, usize> = members.iter().map(|m| (m.clone(), 0)).collect();
    let mut shortfalls = Vec::new();
    let mut layout: Layout = BTreeMap::new();
    // Copies kept first, so the load the additions see is right.
    for (db, ranges) in current {
        for (range, nodes) in ranges {
            let kept: Vec<String> = nodes
                .iter()
                .filter(|n| staying.contains(n))
                .cloned()
                .collect();
            for n in &kept {
                *load.entry(n.clone()).or_default() += 1;
            }
            layout
                .entry(db.clone())
                .or_default()
                .insert(range.clone(), kept);
        }
    }
    for (db, ranges) in current {
        for (range, nodes) in ranges {
            let want = copies(db).unwrap_or(nodes.len());
            if want > members.len() {
                shortfalls.push(Shortfall {
                    database: db.clone(),
                    range: range.clone(),
                    copies: want,
                    members: members.len(),
                });
            }
            let want = want.min(members.len()).max(1);
            let holders = layout
                .get_mut(db)
                .and_then(|r| r.get_mut(range))
                .expect("every range was laid out");
            while holders.len() > want {
                // Drop the copy on the busiest member.
                let (i, _) = holders
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, n)| (load[n.as_str()], std::cmp::Reverse((*n).clone())))
                    .expect("there are holders");
                let gone = holders.remove(i);
                *load.get_mut(&gone).expect("a member") -= 1;
            }
            while holders.len() < want {
                let idlest = members
                    .iter()
                    .filter(|m| !holders.contains(m))
                    .min_by_key(|m| (load[m.as_str()], (*m).clone()))
                    .expect("fewer holders than members");
                *load.get_mut(idlest).expect("a member") += 1;
                holders.push(idlest.clone());
            }
        }
    }
    if rebalance {
        loop {
            let (busiest, most) = load
                .iter()
                .max_by_key(|(m, l)| (**l, std::cmp::Reverse((*m).clone())))
                .map(|(m, l)| (m.clone(), *l))
                .unwrap_or_default();
            let (idlest, least) = load
                .iter()
                .min_by_key(|(m, l)| (**l, (*m).clone()))
                .map(|(m, l)| (m.clone(), *l))
                .unwrap_or_default();
            if most <= least + 1 {
                break;
            }
            // The first range on the busiest member that the idlest lacks.
            let Some(holders) = layout
                .values_mut()
                .flat_map(|r| r.values_mut())
                .find(|h| h.contains(&busiest) && !h.contains(&idlest))
            else {
                break;
            };
            let at = holders.iter().position(|n| *n == busiest).expect("held");
            holders[at] = idlest.clone();
            *load.get_mut(&busiest).expect("a member") -= 1;
            *load.get_mut(&idlest).expect("a member") += 1;
        }
    }
    for ranges in layout.values_mut() {
        for holders in ranges.values_mut() {
            holders.sort();
        }
    }
    Placement { layout, shortfalls }
}

/// The same layout with every node list sorted, to compare with one.
pub fn sorted(layout: &Layout) -> Layout {
    let mut out = layout.clone();
    for ranges in out.values_mut() {
        for holders in ranges.values_mut() {
            holders.sort();
        }
    }
    out
}

/// One shard copy: database, range, node.
pub type ShardCopy = (String, String, String);

/// Copies to add and to drop to go from `from` to `to`.
pub fn moves(from: &Layout, to: &Layout) -> (Vec<ShardCopy>, Vec<ShardCopy>) {
    let mut add = Vec::new();
    let mut drop = Vec::new();
    for (db, ranges) in to {
        for (range, nodes) in ranges {
            let had = from.get(db).and_then(|r| r.get(range));
            for n in nodes {
                if !had.is_some_and(|h| h.contains(n)) {
                    add.push((db.clone(), range.clone(), n.clone()));
                }
            }
            for n in had.into_iter().flatten() {
                if !nodes.contains(n) {
                    drop.push((db.clone(), range.clone(), n.clone()));
                }
            }
        }
    }
    (add, drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    /// `dbs` databases of two ranges, each range on the first `copies` of `on` members.
    fn layout(dbs: &[&str], on: usize, copies: usize) -> Layout {
        dbs.iter()
            .map(|db| {
                let ranges = ["00000000-7fffffff", "80000000-ffffffff"]
                    .iter()
                    .map(|r| {
                        (
                            r.to_string(),
                            members(on).into_iter().take(copies).collect(),
                        )
                    })
                    .collect();
                (db.to_string(), ranges)
            })
            .collect()
    }

    fn loads(layout: &Layout) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for holders in layout.values().flat_map(|r| r.values()) {
            for n in holders {
                *out.entry(n.clone()).or_default() += 1;
            }
        }
        out
    }

    #[test]
    fn a_balanced_cluster_stays_as_it_is() {
        let current = layout(&["_users", "_replicator", "orders"], 3, 3);
        let placed = place(&current, &members(3), |_| None, true);
        assert_eq!(placed.layout, current);
        assert!(placed.shortfalls.is_empty());
    }

    #[test]
    fn growing_with_rebalance_gives_new_members_copies_and_keeps_the_count() {
        let current = layout(&["_users", "_replicator", "orders"], 3, 3);
        let placed = place(&current, &members(5), |_| None, true);
        let load = loads(&placed.layout);
        assert_eq!(load.values().sum::<usize>(), 18, "{load:?}");
        assert!(
            load.values().max().unwrap() - load.values().min().unwrap() <= 1,
            "{load:?}"
        );
        for ranges in placed.layout.values() {
            for holders in ranges.values() {
                assert_eq!(holders.len(), 3);
            }
        }
        let without = place(&current, &members(5), |_| None, false);
        assert_eq!(without.layout, current, "no rebalance: nothing moves");
    }

    #[test]
    fn shrinking_moves_copies_off_departing_members_first() {
        let current = layout(&["orders"], 5, 3);
        let mut spread = current.clone();
        spread.get_mut("orders").unwrap().insert(
            "80000000-ffffffff".into(),
            vec!["n2".into(), "n3".into(), "n4".into()],
        );
        let placed = place(&spread, &members(3), |_| None, true);
        for holders in placed.layout["orders"].values() {
            assert_eq!(holders, &members(3));
        }
        let (add, drop) = moves(&spread, &placed.layout);
        assert_eq!(add.len(), 2);
        assert_eq!(drop.len(), 2);
        assert!(drop.iter().all(|(_, _, n)| n == "n3" || n == "n4"));
    }

    #[test]
    fn a_range_that_cannot_keep_its_copies_is_named_unless_n_is_lowered() {
        let current = layout(&["orders"], 3, 3);
        let placed = place(&current, &members(2), |_| None, true);
        assert_eq!(placed.shortfalls.len(), 2);
        assert_eq!(placed.shortfalls[0].database, "orders");
        assert_eq!(
            (placed.shortfalls[0].copies, placed.shortfalls[0].members),
            (3, 2)
        );
        let lowered = place(&current, &members(2), |_| Some(2), true);
        assert!(lowered.shortfalls.is_empty());
        for holders in lowered.layout["orders"].values() {
            assert_eq!(holders, &members(2));
        }
    }

    #[test]
    fn copies_on_nodes_no_member_backs_are_replaced() {
        let mut current = layout(&["orders"], 3, 3);
        for holders in current.get_mut("orders").unwrap().values_mut() {
            holders[2] = "ghost".into();
        }
        let placed = place(&current, &members(3), |_| None, true);
        for holders in placed.layout["orders"].values() {
            assert_eq!(holders, &members(3));
        }
    }
}
