//! [`FilterTrie`]: topic filters by level, so that routing a topic costs the levels it has and
//! the filters that match it, not the number of filters there are.
//!
//! Each node is one level of a filter: literal children by name, one child for `+`, the
//! subscribers whose filter ends at this level, and those whose filter is this level followed by
//! `#` (which also matches the level itself, MQTT §4.7.1.2). Nodes and subscriber sets sit
//! behind `Arc`s and change copy-on-write (`Arc::make_mut`): a clone of the trie is O(1), and a
//! change to it copies only the nodes on its own path that a clone still shares. So the hub can
//! hand publishers an immutable snapshot after every change without copying the whole table.

use super::topic;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Topic levels split without allocating when routing a topic.
const LEVELS_ON_STACK: usize = 16;

/// Subscribers by key, with a value each.
type Subscribers<V> = Arc<BTreeMap<u64, V>>;

#[derive(Debug, Clone)]
struct Node<V> {
    /// Subscribers whose filter ends at this level.
    here: Subscribers<V>,
    /// Subscribers whose filter is this level followed by `#`.
    under: Subscribers<V>,
    literal: HashMap<Box<str>, Arc<Node<V>>>,
    single: Option<Arc<Node<V>>>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            here: Arc::default(),
            under: Arc::default(),
            literal: HashMap::new(),
            single: None,
        }
    }
}

impl<V: Clone> Node<V> {
    fn is_empty(&self) -> bool {
        self.here.is_empty()
            && self.under.is_empty()
            && self.literal.is_empty()
            && self.single.is_none()
    }
}

/// Topic filters (already validated) with, for each, the subscribers that hold it.
#[derive(Debug, Clone)]
pub struct FilterTrie<V> {
    root: Arc<Node<V>>,
    /// (filter, subscriber) pairs held.
    len: usize,
}

impl<V> Default for FilterTrie<V> {
    fn default() -> Self {
        FilterTrie {
            root: Arc::default(),
            len: 0,
        }
    }
}

impl<V: Clone + PartialEq> FilterTrie<V> {
    /// Adds `key`'s subscription to `filter`, or replaces its value; returns the value replaced.
    pub fn insert(&mut self, filter: &str, key: u64, value: V) -> Option<V> {
        let levels: Vec<&str> = filter.split('/').collect();
        // The same again (a client subscribing again after a reconnect) changes nothing, and
        // must not copy the nodes a snapshot shares.
        if held(&self.root, &levels, key) == Some(&value) {
            return Some(value);
        }
        let replaced = insert(&mut self.root, &levels, key, value);
        self.len += usize::from(replaced.is_none());
        replaced
    }

    /// Removes `key`'s subscription to `filter`; returns its value if it had one. Nodes left
    /// without subscribers or children are removed.
    pub fn remove(&mut self, filter: &str, key: u64) -> Option<V> {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove(&mut self.root, &levels, key);
        if removed.is_some() {
            assert!(self.len > 0, "the count covers every subscription");
            self.len -= 1;
        }
        removed
    }

    /// Calls `each` for every subscription whose filter matches the topic name `name`; a key
    /// with several matching filters is visited once for each. Filters that begin with a
    /// wildcard do not match names that begin with `$` (MQTT §4.7.2).
    pub fn for_each_match(&self, name: &str, mut each: impl FnMut(u64, &V)) {
        // Most topics have few levels: those are split on the stack, not in an allocation.
        let mut stack = [""; LEVELS_ON_STACK];
        let mut heap = Vec::new();
        let mut count = 0;
        for level in topic::split_ascii(name, b'/') {
            if count < LEVELS_ON_STACK {
                stack[count] = level;
            } else {
                if heap.is_empty() {
                    heap.extend_from_slice(&stack);
                }
                heap.push(level);
            }
            count += 1;
        }
        let levels = if heap.is_empty() {
            &stack[..count]
        } else {
            &heap[..]
        };
        let root = &self.root;
        if name.starts_with('$') {
            if let Some(child) = levels.first().and_then(|first| root.literal.get(*first)) {
                visit(child, &levels[1..], &mut each);
            }
            return;
        }
        visit(root, levels, &mut each);
    }

    /// The number of (filter, subscriber) pairs.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn insert<V: Clone>(node: &mut Arc<Node<V>>, levels: &[&str], key: u64, value: V) -> Option<V> {
    let node = Arc::make_mut(node);
    match levels {
        [] => Arc::make_mut(&mut node.here).insert(key, value),
        ["#"] => Arc::make_mut(&mut node.under).insert(key, value),
        ["+", rest @ ..] => insert(node.single.get_or_insert_default(), rest, key, value),
        [level, rest @ ..] => insert(
            node.literal.entry(Box::from(*level)).or_default(),
            rest,
            key,
            value,
        ),
    }
}

fn remove<V: Clone>(node: &mut Arc<Node<V>>, levels: &[&str], key: u64) -> Option<V> {
    // Look before writing: a removal of nothing must not copy nodes a snapshot shares.
    held(node, levels, key)?;
    let node = Arc::make_mut(node);
    match levels {
        [] => Arc::make_mut(&mut node.here).remove(&key),
        ["#"] => Arc::make_mut(&mut node.under).remove(&key),
        ["+", rest @ ..] => {
            let child = node.single.as_mut().expect("held() found it");
            let removed = remove(child, rest, key);
            if child.is_empty() {
                node.single = None;
            }
            removed
        }
        [level, rest @ ..] => {
            let child = node.literal.get_mut(*level).expect("held() found it");
            let removed = remove(child, rest, key);
            if child.is_empty() {
                node.literal.remove(*level);
            }
            removed
        }
    }
}

/// The value `key` holds for the filter made of `levels` under `node`, if any.
fn held<'a, V>(node: &'a Node<V>, levels: &[&str], key: u64) -> Option<&'a V> {
    match levels {
        [] => node.here.get(&key),
        ["#"] => node.under.get(&key),
        ["+", rest @ ..] => node.single.as_ref().and_then(|c| held(c, rest, key)),
        [level, rest @ ..] => node.literal.get(*level).and_then(|c| held(c, rest, key)),
    }
}

fn visit<V>(node: &Node<V>, levels: &[&str], each: &mut impl FnMut(u64, &V)) {
    for (&key, value) in node.under.iter() {
        each(key, value);
    }
    match levels {
        [] => {
            for (&key, value) in node.here.iter() {
                each(key, value);
            }
        }
        [level, rest @ ..] => {
            if let Some(child) = node.literal.get(*level) {
                visit(child, rest, each);
            }
            if let Some(child) = &node.single {
                visit(child, rest, each);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::topic;
    use proptest::prelude::*;

    fn matching(trie: &FilterTrie<&'static str>, name: &str) -> Vec<(u64, &'static str)> {
        let mut found = Vec::new();
        trie.for_each_match(name, |key, filter| found.push((key, *filter)));
        found.sort_unstable();
        found
    }

    #[test]
    fn a_snapshot_is_unchanged_by_later_changes() {
        let mut trie = FilterTrie::default();
        trie.insert("a/+", 1, "a/+");
        let snapshot = trie.clone();
        trie.insert("a/b", 2, "a/b");
        assert_eq!(trie.remove("a/+", 1), Some("a/+"));
        assert_eq!(matching(&snapshot, "a/b"), vec![(1, "a/+")]);
        assert_eq!(matching(&trie, "a/b"), vec![(2, "a/b")]);
        assert_eq!((snapshot.len(), trie.len()), (1, 1));
    }

    #[test]
    fn removing_the_last_subscription_empties_the_trie() {
        let mut trie = FilterTrie::default();
        for (key, filter) in [(1, "a/b/c"), (2, "a/+/c"), (3, "a/#"), (1, "#")] {
            trie.insert(filter, key, filter);
        }
        assert_eq!(trie.remove("a/b", 1), None, "not held");
        assert_eq!(trie.remove("a/b/c", 2), None, "held by another key");
        for (key, filter) in [(1, "a/b/c"), (2, "a/+/c"), (3, "a/#"), (1, "#")] {
            assert_eq!(trie.remove(filter, key), Some(filter));
        }
        assert!(trie.is_empty() && trie.root.is_empty());
    }

    #[test]
    fn a_topic_deeper_than_the_stack_buffer_matches_too() {
        let deep: Vec<String> = (0..LEVELS_ON_STACK + 4).map(|i| format!("l{i}")).collect();
        let name = deep.join("/");
        let mut trie = FilterTrie::default();
        trie.insert(&name, 1, "exact");
        trie.insert("l0/#", 2, "l0/#");
        trie.insert(&format!("{}/+", deep[..deep.len() - 1].join("/")), 3, "+");
        assert_eq!(
            matching(&trie, &name),
            vec![(1, "exact"), (2, "l0/#"), (3, "+")]
        );
    }

    const LEVELS: [&str; 4] = ["a", "b", "", "$x"];

    fn arb_name() -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(LEVELS.to_vec()), 1..5)
            .prop_map(|levels| levels.join("/"))
    }

    fn arb_filter() -> impl Strategy<Value = String> {
        let level = proptest::sample::select(vec!["a", "b", "", "$x", "+"]);
        (proptest::collection::vec(level, 0..4), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash || levels.is_empty() {
                levels.push("#");
            }
            levels.join("/")
        })
    }

    proptest! {
        /// Goal: the trie matches exactly as `topic::matches` does, filter by filter, after
        /// any sequence of subscriptions and removals.
        #[test]
        fn matches_like_the_filter_matcher(
            changes in proptest::collection::vec((0u64..4, arb_filter(), any::<bool>()), 1..40),
            names in proptest::collection::vec(arb_name(), 1..10),
        ) {
            let mut trie = FilterTrie::default();
            let mut model: BTreeMap<(u64, String), ()> = BTreeMap::new();
            for (key, filter, add) in changes {
                if add {
                    trie.insert(&filter, key, filter.clone());
                    model.insert((key, filter), ());
                } else {
                    let removed = trie.remove(&filter, key);
                    prop_assert_eq!(removed.is_some(), model.remove(&(key, filter)).is_some());
                }
            }
            prop_assert_eq!(trie.len(), model.len());
            for name in names {
                let mut found = Vec::new();
                trie.for_each_match(&name, |key, filter| found.push((key, filter.clone())));
                found.sort();
                let expected: Vec<(u64, String)> = model
                    .keys()
                    .filter(|(_, filter)| topic::matches(filter, &name))
                    .cloned()
                    .collect();
                prop_assert_eq!(found, expected, "name {:?}", name);
            }
        }
    }
}
