use super::*;

fn lineage() -> Lineage<'static> {
    Lineage {
        parent_id: "p-1",
        root_id: "r-1",
        origin: "w@host",
        now: envelope::parse_time("2026-12-02T10:00:00Z").expect("time"),
    }
}

/// The chain step a real Celery 5.7 client froze (celery-wire-capture.md).
fn captured_step() -> Value {
    json!({"task":"cap.add","args":[4],"kwargs":{},"options":{"task_id":"ae10117d-8fd9-4440-a62a-dc771f268d36","reply_to":"aee234ba-5b9b-34da-bfad-bddc7b160bb0"},"subtask_type":null,"immutable":false})
}

fn decoded(f: &FollowUp) -> envelope::TaskMessage {
    envelope::decode(&f.payload).expect("a follow-up decodes as a task message")
}

#[test]
fn chain_step_gets_the_result_first_and_carries_the_rest() {
    let sig = Signature::parse(&captured_step()).expect("parses");
    let rest = [json!({"task": "cap.add", "args": [1]})];
    let send = Dispatch {
        prepend: Some(json!(4)),
        chain: Some(&rest),
        fallback_id: "unused".into(),
        group: None,
    };
    let f = build(&sig, &send, &lineage());
    assert_eq!(f.task_id, "ae10117d-8fd9-4440-a62a-dc771f268d36");
    assert_eq!(f.queue_key, "celery");
    let m = decoded(&f);
    assert_eq!(m.args, vec![json!(4), json!(4)]);
    assert_eq!(m.parent_id.as_deref(), Some("p-1"));
    assert_eq!(m.root_id.as_deref(), Some("r-1"));
    assert_eq!(m.embed()["chain"], json!(rest));
    assert_eq!(
        m.property("reply_to"),
        Some(&json!("aee234ba-5b9b-34da-bfad-bddc7b160bb0"))
    );
}

#[test]
fn immutable_signatures_keep_their_args() {
    let mut v = captured_step();
    v["immutable"] = json!(true);
    let sig = Signature::parse(&v).expect("parses");
    let send = Dispatch {
        prepend: Some(json!(99)),
        ..Default::default()
    };
    assert_eq!(
        decoded(&build(&sig, &send, &lineage())).args,
        vec![json!(4)]
    );
}

#[test]
fn options_route_delay_and_prioritise() {
    let sig = Signature::parse(&json!({
        "task": "t", "args": [], "kwargs": {"k": 1},
        "options": {"queue": "other", "priority": 6, "countdown": 30, "link": {"task": "cb"}},
    }))
    .expect("parses");
    let send = Dispatch {
        fallback_id: "given".into(),
        ..Default::default()
    };
    let f = build(&sig, &send, &lineage());
    assert_eq!(f.task_id, "given");
    assert_eq!(f.queue_key, "other\x06\x166");
    let m = decoded(&f);
    assert_eq!(
        m.eta.map(envelope::format_time).as_deref(),
        Some("2026-12-02T10:00:30.000000+00:00")
    );
    assert_eq!(m.embed()["callbacks"], json!([{"task": "cb"}]));
    assert_eq!(m.kwargs.get("k"), Some(&json!(1)));
}

#[test]
fn nested_canvases_are_refused_by_name() {
    let sig = Signature::parse(&json!({"task": "celery.group", "subtask_type": "group"}))
        .expect("parses");
    let err = sig.check_plain().expect_err("refused");
    assert!(err.to_string().contains("\"group\""), "{err}");
}

#[test]
fn derived_ids_are_stable_and_distinct() {
    assert_eq!(derived_id("a", "link/0"), derived_id("a", "link/0"));
    assert_ne!(derived_id("a", "link/0"), derived_id("a", "link/1"));
    assert_ne!(derived_id("a", "chain"), derived_id("b", "chain"));
}

#[test]
fn children_and_exceptions_read_as_celery_writes_them() {
    assert_eq!(child("x"), json!([["x", null], null]));
    assert_eq!(
        group_child("g", &["a".into()]),
        json!([["g", null], [[["a", null], null]]])
    );
    let exc = json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"});
    assert_eq!(exception_repr(&exc), "ValueError('boom')");
}
