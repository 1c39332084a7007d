//! Issue 16, authority: acting as another agent follows the agents one
//! made (and the agents they made), never every agent one can name. A
//! sub-host made with `mkhost` cannot act as its own HOST, nor as a sibling
//! or an agent of its host that it was mailed.

use capstan_actors::{AgentHandle, Error, RefSpec, Runtime};
use capstan_proto::RequestId;

async fn runtime() -> Runtime {
    Runtime::in_memory().await.expect("runtime")
}

/// `from` mails `@what` to `to` (a path in `from`'s names); `to` adopts it
/// as `name`.
async fn hand_over(from: &AgentHandle, to_path: &str, to: &AgentHandle, what: &str, name: &str) {
    from.send(
        RequestId::random(),
        to_path,
        vec![String::new(), String::new()],
        vec![RefSpec {
            path: what.into(),
            edge_name: name.into(),
        }],
        None,
    )
    .await
    .expect("send");
    let m = to.inbox(None).await.expect("inbox");
    let n = m.last().expect("the message").number;
    to.adopt(RequestId::random(), n, name, name)
        .await
        .expect("adopt");
}

fn assert_refused(r: Result<AgentHandle, Error>, what: &str) {
    match r {
        Ok(h) => panic!("{what}: acted as {h:?}"),
        Err(e) => assert!(
            e.to_string().contains("made"),
            "{what}: the error says why: {e}"
        ),
    }
}

#[tokio::test]
async fn a_host_acts_only_as_itself_and_the_agents_it_made() {
    let rt = runtime().await;
    let root = rt.root_host();
    root.mkhost(RequestId::random(), "bob").await.unwrap();
    root.mkhost(RequestId::random(), "carol").await.unwrap();
    root.mkguest(RequestId::random(), "alice").await.unwrap();
    let bob = root
        .agent("bob")
        .await
        .expect("the root acts as the host it made");

    // Not as its own host.
    assert_refused(bob.agent("HOST").await, "bob as HOST");
    // Itself, yes.
    assert_eq!(bob.agent("SELF").await.unwrap().id(), bob.id());
    // Not as agents it was given a name for, but did not make.
    hand_over(&root, "bob", &bob, "alice", "alice").await;
    hand_over(&root, "bob", &bob, "carol", "carol").await;
    assert_eq!(bob.show("alice").await.unwrap().kind, "guest");
    assert_refused(bob.agent("alice").await, "bob as the root's guest");
    assert_refused(bob.agent("carol").await, "bob as a sibling");

    // The agents it made, and theirs.
    bob.mkguest(RequestId::random(), "helper").await.unwrap();
    bob.mkhost(RequestId::random(), "team").await.unwrap();
    let helper = bob.agent("helper").await.expect("bob as his guest");
    let team = bob.agent("team").await.expect("bob as his sub-host");
    team.mkguest(RequestId::random(), "worker").await.unwrap();
    hand_over(&team, "HOST", &bob, "worker", "worker").await;
    bob.agent("worker")
        .await
        .expect("bob as the guest his sub-host made");
    // And the root, which made bob, as all of them.
    hand_over(&bob, "HOST", &root, "worker", "worker").await;
    root.agent("worker")
        .await
        .expect("the root as a descendant");
    // Going up is refused at every level.
    assert_refused(team.agent("HOST").await, "team as bob");
    assert!(
        helper.agent("HOST").await.is_err(),
        "a guest acts as no other agent"
    );
}
