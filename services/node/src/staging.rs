//! Latest-wins staging: many producers stage values by key without waiting;
//! one consumer takes everything staged at once. A key staged twice before a
//! take holds one value, folded by the owner's merge rule, so memory is bounded
//! by the number of keys, not by the rate of changes.
//!
//! The map is split into stripes, each under its own short lock, so producers
//! on different cores rarely meet.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
};

use parking_lot::Mutex;

pub struct LatestWins<K, V> {
    stripes: Box<[Mutex<HashMap<K, V>>]>,
    hasher: RandomState,
    merge: fn(Option<V>, V) -> V,
}

/// Replaces the older value with the newer.
pub fn newest<V>(_older: Option<V>, newer: V) -> V {
    newer
}

const STRIPES: usize = 16;

impl<K: Hash + Eq, V> LatestWins<K, V> {
    /// `merge(older, newer)` folds a newly staged value into the one already
    /// staged for its key.
    pub fn new(merge: fn(Option<V>, V) -> V) -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            merge,
        }
    }

    /// Stages a value; returns whether it folded into one already staged.
    pub fn stage(&self, key: K, value: V) -> bool {
        let stripe = &self.stripes[self.hasher.hash_one(&key) as usize % STRIPES];
        let mut staged = stripe.lock();
        let older = staged.remove(&key);
        let folded = older.is_some();
        staged.insert(key, (self.merge)(older, value));
        folded
    }

    /// Moves everything staged into `into`, folding it over what `into`
    /// already holds (older values, e.g. from a failed attempt).
    pub fn take_into(&self, into: &mut HashMap<K, V>) {
        for stripe in self.stripes.iter() {
            let taken = std::mem::take(&mut *stripe.lock());
            if into.is_empty() {
                *into = taken;
                continue;
            }
            for (key, value) in taken {
                let older = into.remove(&key);
                into.insert(key, (self.merge)(older, value));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_staged_many_times_is_taken_once_with_its_latest_value() {
        let staging = LatestWins::new(newest);
        assert!(!staging.stage("a", 1));
        assert!(staging.stage("a", 2));
        staging.stage("b", 7);
        let mut taken = HashMap::new();
        staging.take_into(&mut taken);
        assert_eq!(taken, HashMap::from([("a", 2), ("b", 7)]));
        let mut again = HashMap::new();
        staging.take_into(&mut again);
        assert!(again.is_empty());
    }

    #[test]
    fn taken_values_fold_over_older_ones_with_the_merge_rule() {
        let staging = LatestWins::new(|older: Option<u32>, newer| older.unwrap_or(0) + newer);
        let mut older = HashMap::from([("a", 10)]);
        staging.stage("a", 1);
        staging.stage("a", 2);
        staging.take_into(&mut older);
        assert_eq!(older["a"], 13);
    }
}
