//! The metadata store: checkpoints survive a reopen once durably committed, never move
//! backwards, retention sees only durable ones, and a checkpoint past the end of the log stops
//! the log from opening ("metadata ahead of the log").
#![allow(clippy::unwrap_used)]

mod common;

use common::{payload_for, runtime};
use spool_storage::{Commit, Error, Meta, StateTable, Wal, WalOptions};

#[test]
fn durable_checkpoints_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let meta = Meta::open(&path).unwrap();
    meta.set_checkpoints(
        &[("module-a/input1", 10), ("module-b/input1", 3)],
        Commit::Durable,
    )
    .unwrap();
    meta.set_checkpoints(&[("module-a/input1", 12)], Commit::Deferred)
        .unwrap();
    meta.make_durable().unwrap();
    drop(meta);
    let meta = Meta::open(&path).unwrap();
    assert_eq!(meta.checkpoint("module-a/input1").unwrap(), Some(12));
    assert_eq!(meta.checkpoint("module-b/input1").unwrap(), Some(3));
    assert_eq!(meta.checkpoint("nobody").unwrap(), None);
    assert_eq!(meta.highest_checkpoint().unwrap(), 12);
    meta.remove_checkpoint("module-b/input1", Commit::Durable)
        .unwrap();
    assert_eq!(meta.checkpoints().unwrap().len(), 1);
}

#[test]
fn checkpoints_never_move_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let meta = Meta::open(&dir.path().join("meta.redb")).unwrap();
    meta.set_checkpoints(&[("q", 7)], Commit::Durable).unwrap();
    let err = meta
        .set_checkpoints(&[("q", 6)], Commit::Durable)
        .unwrap_err();
    assert!(
        matches!(err, Error::CheckpointBackwards { from: 7, to: 6, .. }),
        "{err:?}"
    );
    assert_eq!(
        meta.checkpoint("q").unwrap(),
        Some(7),
        "a refused update changes nothing"
    );
}

#[test]
fn second_open_of_the_store_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let _meta = Meta::open(&path).unwrap();
    let err = Meta::open(&path).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err:?}");
}

#[test]
fn a_checkpoint_past_the_end_of_the_log_refuses_the_open() {
    // Goal: the log lost records a consumer had acknowledged (say, a restored older volume):
    // the metadata is ahead of the log, and start-up must stop rather than reuse those numbers.
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    let meta = Meta::open(&dir.path().join("meta.redb")).unwrap();
    let (wal, _) = Wal::open(&wal_dir, WalOptions::default()).unwrap();
    let last = runtime().block_on(async {
        let mut last = 0;
        for i in 1..=5 {
            last = wal.append(1, payload_for(i, 0)).await.unwrap();
        }
        last
    });
    meta.set_checkpoints(&[("q", last)], Commit::Durable)
        .unwrap();
    drop(wal);
    std::fs::remove_dir_all(&wal_dir).unwrap();
    let options = WalOptions {
        required_last_seq: meta.highest_checkpoint().unwrap(),
        ..WalOptions::default()
    };
    let err = Wal::open(&wal_dir, options).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MetadataAhead {
                required: 5,
                last_seq: 0
            }
        ),
        "{err:?}"
    );
}

#[test]
fn state_changes_commit_atomically_with_their_checkpoint() {
    // Goal: "every retained change up to this checkpoint is stored" holds across a reopen, and a
    // refused checkpoint writes no retained change either.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let meta = Meta::open(&path).unwrap();
    meta.set_checkpoints_and_state(
        &[("retained", 10)],
        &[
            (StateTable::Retained, "a/b", Some(b"one")),
            (StateTable::Retained, "a/c", Some(b"two")),
            (StateTable::Qos2Receipts, "7", Some(b"ids")),
        ],
        Commit::Durable,
    )
    .unwrap();
    meta.set_checkpoints_and_state(
        &[("retained", 12)],
        &[
            (StateTable::Retained, "a/b", None),
            (StateTable::Retained, "a/c", Some(b"three")),
        ],
        Commit::Durable,
    )
    .unwrap();
    let backwards = meta.set_checkpoints_and_state(
        &[("retained", 11)],
        &[
            (StateTable::Retained, "a/d", Some(b"never")),
            (StateTable::Qos2Receipts, "7", None),
        ],
        Commit::Durable,
    );
    assert!(matches!(backwards, Err(Error::CheckpointBackwards { .. })));
    drop(meta);

    let meta = Meta::open(&path).unwrap();
    let retained = meta.state(StateTable::Retained).unwrap();
    assert_eq!(
        retained.into_iter().collect::<Vec<_>>(),
        vec![("a/c".to_string(), b"three".to_vec())]
    );
    assert_eq!(
        meta.state(StateTable::Qos2Receipts).unwrap().get("7"),
        Some(&b"ids".to_vec()),
        "the refused commit removed nothing"
    );
    assert_eq!(meta.checkpoint("retained").unwrap(), Some(12));
}

#[test]
fn a_batch_of_changes_commits_together_and_in_order() {
    // Goal: `Meta::apply` makes every change of a batch durable in one commit, applied in
    // order (a session stored then removed in one batch is gone).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let meta = Meta::open(&path).unwrap();
    meta.set_checkpoints(&[("session/1", 4)], Commit::Durable)
        .unwrap();
    let session = |client: &str, state: Option<&[u8]>| spool_storage::MetaChange::Session {
        client_id: client.to_string(),
        state: state.map(<[u8]>::to_vec),
    };
    let changes = [
        session("a", Some(b"one")),
        session("b", Some(b"two")),
        session("b", None),
        spool_storage::MetaChange::RemoveCheckpoint("session/1".into()),
        spool_storage::MetaChange::State {
            table: StateTable::Qos2Receipts,
            key: "1".into(),
            value: Some(b"r".to_vec()),
        },
    ];
    meta.apply(&changes, Commit::Durable).unwrap();
    drop(meta);
    let meta = Meta::open(&path).unwrap();
    let sessions = meta.sessions().unwrap();
    assert_eq!(sessions.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(sessions["a"], b"one");
    assert_eq!(meta.checkpoint("session/1").unwrap(), None);
    assert_eq!(meta.state(StateTable::Qos2Receipts).unwrap()["1"], b"r");
}
