//! Rounds this process has taken uploads for, with what an upload refused before its slot needs to
//! know of them: the task, its upload limit, and whether the round has stopped taking updates.
//!
//! A round stops taking updates when it is closed, past its deadline, or holds K accepted updates.
//! Each of the three is final (a round never reopens, and neither its deadline nor its task's K
//! changes), so an upload to such a round can be refused before it waits for an upload slot or has
//! its body read and hashed: a late device gets its final `409 round_closed` at once, instead of
//! `503 server_busy` and a resend of its whole update only to be refused then.
//!
//! The upload limit bounds what is drained of a body refused before its slot (late, or `503
//! server_busy`), so that the answer reaches a client still sending on a connection that stays
//! open; a body refused for a round this process does not know is left unread, and its connection
//! closes.
//!
//! A cache, bounded: the oldest rounds are forgotten, and an upload to a round this process has not
//! seen close takes the slot and is refused there, as before.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    sync::Mutex,
};

/// Rounds remembered; far more than the open rounds of the tasks one server runs.
const CAPACITY: usize = 4096;

/// What a refusal before the slot needs to know of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownRound {
    /// For the refusal's metric.
    pub task_id: String,
    /// The task's upload limit: the most bytes of a refused body drained before the answer.
    pub upload_limit: usize,
    /// The round takes no more updates (final once seen).
    pub closed: bool,
}

#[derive(Default)]
pub struct KnownRounds {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<i64, KnownRound>,
    /// Round ids, oldest first, to forget past [`CAPACITY`].
    order: VecDeque<i64>,
}

impl KnownRounds {
    /// Remembers `round_id`; a round once seen closed stays closed.
    pub fn insert(&self, round_id: i64, round: KnownRound) {
        let mut inner = self.inner.lock().expect("known rounds");
        match inner.by_id.entry(round_id) {
            Entry::Occupied(mut known) => {
                known.get_mut().closed |= round.closed;
                return;
            }
            Entry::Vacant(slot) => {
                slot.insert(round);
            }
        }
        inner.order.push_back(round_id);
        if inner.order.len() > CAPACITY
            && let Some(oldest) = inner.order.pop_front()
        {
            inner.by_id.remove(&oldest);
        }
    }

    /// The round, if this process has taken an upload for it.
    pub fn get(&self, round_id: i64) -> Option<KnownRound> {
        self.inner
            .lock()
            .expect("known rounds")
            .by_id
            .get(&round_id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(task: &str, closed: bool) -> KnownRound {
        KnownRound {
            task_id: task.into(),
            upload_limit: 100,
            closed,
        }
    }

    #[test]
    fn remembers_rounds_and_forgets_the_oldest_past_its_capacity() {
        let known = KnownRounds::default();
        assert_eq!(known.get(1), None);
        known.insert(1, round("a", true));
        known.insert(1, round("a", true));
        assert_eq!(known.get(1), Some(round("a", true)));
        for id in 2..=CAPACITY as i64 {
            known.insert(id, round("b", false));
        }
        assert_eq!(
            known.get(1),
            Some(round("a", true)),
            "a round inserted twice counts once"
        );
        known.insert(CAPACITY as i64 + 1, round("c", false));
        assert_eq!(known.get(1), None, "the oldest is forgotten");
        assert_eq!(known.get(2), Some(round("b", false)));
        assert_eq!(known.get(CAPACITY as i64 + 1), Some(round("c", false)));
    }

    #[test]
    fn a_round_seen_closed_stays_closed() {
        let known = KnownRounds::default();
        known.insert(1, round("a", false));
        assert_eq!(known.get(1), Some(round("a", false)));
        known.insert(1, round("a", true));
        assert_eq!(known.get(1), Some(round("a", true)));
        known.insert(1, round("a", false));
        assert_eq!(known.get(1), Some(round("a", true)), "closing is final");
    }
}
