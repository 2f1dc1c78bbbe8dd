//! The behaviour every [`Store`] must show; each implementation runs `run_all` in its tests.

use std::future::Future;
use std::time::Duration;

use serde_json::value::RawValue;

use super::{Appended, Draft, Head, Receipt, Store};
use crate::config::Retention;
use crate::ids::UserId;

pub const LONG: Retention = Retention {
    per_user: 1000,
    max_age: Duration::from_secs(3600),
};

pub fn draft(n: u64, key: Option<&str>) -> Draft {
    Draft {
        id: format!("n-{n}"),
        event: Some("test".into()),
        data: RawValue::from_string(format!(r#"{{"n":{n}}}"#)).unwrap(),
        ts: "2026-11-25T17:00:00Z".into(),
        ts_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
        idempotency_key: key.map(str::to_owned),
    }
}

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

async fn seq_of<S: Store>(store: &S, u: &UserId, d: Draft) -> u64 {
    match store.append(u, d).await.expect("append") {
        Appended::New(n) => n.seq,
        Appended::Duplicate(r) => panic!("unexpected duplicate {r:?}"),
    }
}

/// Runs every case against fresh stores made by `make` (which also returns
/// whatever must live as long as the store, such as a temp dir).
pub async fn run_all<S, G, F>(make: F)
where
    S: Store,
    F: Fn(Retention) -> (S, G),
{
    seqs_count_per_user_without_gaps(make(LONG).0).await;
    concurrent_appends_get_distinct_consecutive_seqs(make(LONG).0).await;
    read_pages_oldest_first(make(LONG).0).await;
    idempotency_answers_the_first_receipt(make(LONG).0).await;
    retention_by_count(
        make(Retention {
            per_user: 3,
            ..LONG
        })
        .0,
    )
    .await;
    retention_by_age(
        make(Retention {
            per_user: 1000,
            max_age: Duration::from_millis(600),
        })
        .0,
    )
    .await;
}

async fn seqs_count_per_user_without_gaps<S: Store>(store: S) {
    let (a, b) = (user("a"), user("b"));
    assert_eq!(
        store.head(&a).await.unwrap(),
        Head {
            first_seq: 1,
            last_seq: 0
        },
        "empty user"
    );
    assert_eq!(seq_of(&store, &a, draft(1, None)).await, 1);
    assert_eq!(seq_of(&store, &a, draft(2, None)).await, 2);
    assert_eq!(
        seq_of(&store, &b, draft(3, None)).await,
        1,
        "each user has its own seq"
    );
    assert_eq!(
        store.head(&a).await.unwrap(),
        Head {
            first_seq: 1,
            last_seq: 2
        }
    );
}

async fn concurrent_appends_get_distinct_consecutive_seqs<S: Store>(store: S) {
    let a = user("a");
    let appends = (0..200).map(|i| seq_of(&store, &a, draft(i, None)));
    let mut seqs = futures_util::future::join_all(appends).await;
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

async fn read_pages_oldest_first<S: Store>(store: S) {
    let a = user("a");
    for i in 1..=10 {
        seq_of(&store, &a, draft(i, None)).await;
    }
    let page = store.read(&a, 3, 4).await.unwrap();
    assert_eq!(
        page.iter().map(|s| s.seq).collect::<Vec<_>>(),
        vec![4, 5, 6, 7]
    );
    let frame: serde_json::Value = serde_json::from_str(&page[0].frame).unwrap();
    assert_eq!(frame["type"], "notification");
    assert_eq!(frame["seq"], 4);
    assert_eq!(frame["data"]["n"], 4);
    assert!(store.read(&a, 10, 100).await.unwrap().is_empty());
    assert!(
        store
            .read(&user("nobody"), 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn idempotency_answers_the_first_receipt<S: Store>(store: S) {
    let (a, b) = (user("a"), user("b"));
    let Appended::New(first) = store.append(&a, draft(1, Some("k"))).await.unwrap() else {
        panic!("first is new")
    };
    store.record_delivered(&a, "k", 2).await.unwrap();
    let expected = Receipt {
        id: first.id.clone(),
        seq: first.seq,
        delivered: 2,
    };
    // record_delivered may be applied lazily; a later append is ordered after it.
    match store.append(&a, draft(2, Some("k"))).await.unwrap() {
        Appended::Duplicate(r) => assert_eq!(r, expected),
        Appended::New(n) => panic!("same key stored twice as seq {}", n.seq),
    }
    assert_eq!(
        store.head(&a).await.unwrap().last_seq,
        1,
        "a duplicate takes no seq"
    );
    assert_eq!(
        seq_of(&store, &b, draft(3, Some("k"))).await,
        1,
        "keys are per user"
    );
    assert_eq!(seq_of(&store, &a, draft(4, Some("other"))).await, 2);
}

async fn retention_by_count<S: Store>(store: S) {
    let a = user("a");
    for i in 1..=5 {
        seq_of(&store, &a, draft(i, None)).await;
    }
    let kept: Vec<_> = store
        .read(&a, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|s| s.seq)
        .collect();
    assert_eq!(kept, vec![3, 4, 5]);
    assert_eq!(
        store.head(&a).await.unwrap(),
        Head {
            first_seq: 3,
            last_seq: 5
        }
    );
}

async fn retention_by_age<S: Store>(store: S) {
    let a = user("a");
    seq_of(&store, &a, draft(1, Some("k"))).await;
    assert_eq!(store.read(&a, 0, 10).await.unwrap().len(), 1);
    sleep(Duration::from_millis(700)).await;
    assert!(
        store.read(&a, 0, 10).await.unwrap().is_empty(),
        "expired notifications are not replayed"
    );
    assert_eq!(
        store.head(&a).await.unwrap(),
        Head {
            first_seq: 2,
            last_seq: 1
        }
    );
    assert_eq!(
        seq_of(&store, &a, draft(2, Some("k"))).await,
        2,
        "expired key is forgotten; seq is never reused"
    );
}

fn sleep(d: Duration) -> impl Future<Output = ()> {
    tokio::time::sleep(d)
}
