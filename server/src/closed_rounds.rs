//! Rounds this process has seen stop taking updates: closed, past their deadline, or holding K
//! accepted updates. Each of the three is final (a round never reopens, and neither its deadline
//! nor its task's K changes), so an upload to such a round can be refused before it waits for an
//! upload slot or has its body read and hashed: a late device gets its final `409 round_closed` at
//! once, instead of `503 server_busy` and a resend of its whole update only to be refused then.
//!
//! A cache, bounded: the oldest rounds are forgotten, and an upload to a round this process has not
//! seen close takes the slot and is refused there, as before.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

/// Rounds remembered; far more than the open rounds of the tasks one server runs.
const CAPACITY: usize = 4096;

/// What a refusal before the slot needs to know of a closed round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedRound {
    /// For the refusal's metric.
    pub task_id: String,
    /// The task's upload limit: the most bytes of a late body drained before the answer.
    pub upload_limit: usize,
}

#[derive(Default)]
pub struct ClosedRounds {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<i64, ClosedRound>,
    /// Round ids, oldest first, to forget past [`CAPACITY`].
    order: VecDeque<i64>,
}

impl ClosedRounds {
    /// Remembers that `round_id` takes no more updates.
    pub fn insert(&self, round_id: i64, round: ClosedRound) {
        let mut inner = self.inner.lock().expect("closed rounds");
        if inner.by_id.insert(round_id, round).is_some() {
            return;
        }
        inner.order.push_back(round_id);
        if inner.order.len() > CAPACITY
            && let Some(oldest) = inner.order.pop_front()
        {
            inner.by_id.remove(&oldest);
        }
    }

    /// The round, if this process has seen it stop taking updates.
    pub fn get(&self, round_id: i64) -> Option<ClosedRound> {
        self.inner
            .lock()
            .expect("closed rounds")
            .by_id
            .get(&round_id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(task: &str) -> ClosedRound {
        ClosedRound {
            task_id: task.into(),
            upload_limit: 100,
        }
    }

    #[test]
    fn remembers_rounds_and_forgets_the_oldest_past_its_capacity() {
        let closed = ClosedRounds::default();
        assert_eq!(closed.get(1), None);
        closed.insert(1, round("a"));
        closed.insert(1, round("a"));
        assert_eq!(closed.get(1), Some(round("a")));
        for id in 2..=CAPACITY as i64 {
            closed.insert(id, round("b"));
        }
        assert_eq!(
            closed.get(1),
            Some(round("a")),
            "a round inserted twice counts once"
        );
        closed.insert(CAPACITY as i64 + 1, round("c"));
        assert_eq!(closed.get(1), None, "the oldest is forgotten");
        assert_eq!(closed.get(2), Some(round("b")));
        assert_eq!(closed.get(CAPACITY as i64 + 1), Some(round("c")));
    }
}
