//! The approvers' web console (issue 18) in a real headless Chromium,
//! driven over WebDriver, against the real `epm-platform` binary on
//! 127.0.0.1 and, for the approval flow, a real `epmd` and a real user.
//!
//! `EPM_SCREENSHOTS=1` makes the run save the pictures in
//! `docs/console.md` (docs/images/console-*.png).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use epm_e2e::browser::{Browser, browser_capable};
use epm_e2e::platform::{Platform, RestAgent};
use epm_e2e::{Daemon, TestUser, capable, denied, policy, ran};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";
const WAIT: Duration = Duration::from_secs(20);

fn docs_image(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/images")
        .join(name)
}

fn approve_rule(id: &str, matcher: &str, levels: usize, uses: u32) -> String {
    let levels = vec![r#"{"approvers": 1}"#; levels].join(",");
    format!(
        r#"{{"id": "{id}", "action": "approve", "match": {matcher},
            "message": "Packet capture needs a manager's and security's approval",
            "approval": {{"levels": [{levels}], "max_window_hours": 8, "uses": {uses}}}}}"#
    )
}

/// The owner (`e2e`, approving at level 1) with a console password.
fn platform_with(serve_args: &[&str]) -> Platform {
    let platform = Platform::start_with(serve_args);
    platform.set_password("e2e", PASSWORD);
    platform
}

/// Submits a request of `agent`'s for rule `capture`, a window from five
/// minutes on; returns its id.
fn ask(
    agent: &RestAgent,
    platform: &Platform,
    local_id: &str,
    user: &str,
    path: &str,
    why: &str,
) -> String {
    let start = jiff::Timestamp::now() + jiff::SignedDuration::from_mins(5);
    let end = start + jiff::SignedDuration::from_hours(2);
    let body = json!({"local_id": local_id, "rule_id": "capture", "policy_version": 1, "user": user,
        "subject": {"identity": {"kind": "sha256", "value": hex_of(local_id)},
            "path": path, "team_id": "UBF8T346G9", "signing_id": "org.wireshark.Wireshark"},
        "justification": why, "window": {"start": start, "end": end}});
    let (status, answer) = agent.submit_body(platform, &body);
    assert_eq!(status, 200, "{answer}");
    answer["id"].as_str().unwrap().to_owned()
}

fn hex_of(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

#[test]
fn sign_in_refuses_a_wrong_password_and_locks_an_account_after_five_failures() {
    if !browser_capable() {
        return;
    }
    let platform = platform_with(&[]);
    platform.admin_with("epc-lock", &["--role", "auditor"]);
    platform.set_password("epc-lock", PASSWORD);
    let browser = Browser::start();
    let base = platform.url();

    for attempt in 1..=5 {
        browser.sign_in(&base, "epc-lock", &format!("wrong password {attempt}"));
        browser.wait_for_text("Wrong name or password.", WAIT);
        assert!(browser.text().contains("Sign in"), "still signing in");
    }
    // Locked now, even with the right password.
    browser.sign_in(&base, "epc-lock", PASSWORD);
    browser.wait_for_text("Too many failed sign-ins", WAIT);
    // Another account from the same address still signs in.
    browser.sign_in(&base, "e2e", PASSWORD);
    browser.wait_for_text("Waiting for you", WAIT);
    // Each failure is in the activity log, with the address.
    let failures = platform.activity_with("failed console sign-in as epc-lock");
    assert_eq!(failures.len(), 5, "{failures:?}");
    assert!(
        failures[0]["detail"]
            .as_str()
            .unwrap()
            .contains("from 127.0.0.1: wrong password"),
        "{failures:?}"
    );
    assert_eq!(platform.activity_with("signed in to the console").len(), 1);
}

#[test]
fn a_request_appears_in_the_inbox_without_a_reload_and_its_text_stays_inert() {
    if !browser_capable() {
        return;
    }
    let platform = platform_with(&[]);
    platform.push(
        &policy(
            1,
            "allow",
            &[approve_rule("capture", r#"{"name": "Wireshark"}"#, 2, 1)],
        ),
        &[],
    );
    let first = RestAgent::enroll_for(&platform, "mac-0042", "alice");
    let second = RestAgent::enroll_for(&platform, "lnx-build-7", "bob");
    ask(
        &first,
        &platform,
        "one",
        "alice",
        "/Applications/Wireshark.app/Contents/MacOS/Wireshark",
        "Capture the VPN handshake for INC-4411 (customer call at 14:00)",
    );
    let browser = Browser::start();
    let base = platform.url();
    browser.sign_in(&base, "e2e", PASSWORD);
    browser.wait_for_text("INC-4411", WAIT);

    // New requests arrive while the page stays open: the script polls.
    let hostile =
        "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> need it";
    let id = ask(
        &second,
        &platform,
        "two",
        "bob",
        "/opt/wireshark/bin/Wireshark",
        hostile,
    );
    third_request(&platform, &first);
    browser.wait_for_text("need it", WAIT);
    let pwned = browser.execute(
        "return window.pwned === undefined ? null : window.pwned;",
        vec![],
    );
    assert_eq!(pwned, Value::Null, "the justification ran as markup");
    let counted = browser.text_of("#count-mine");
    assert_eq!(counted, "3", "the navigation counts what waits for level 1");
    // After the new rows' highlight fades.
    std::thread::sleep(Duration::from_millis(2500));
    browser.screenshot_for_docs(&docs_image("console-inbox.png"));

    // The request page shows the justification as text, nothing run.
    browser.goto(&format!("{base}/console/requests/{id}"));
    browser.wait_for_text("Recent audit", WAIT);
    let shown = browser.text_of("blockquote.just");
    assert_eq!(shown, hostile);
    let pwned = browser.execute(
        "return window.pwned === undefined ? null : window.pwned;",
        vec![],
    );
    assert_eq!(pwned, Value::Null);
    let text = browser.text();
    for fact in [
        "lnx-build-7",
        "UBF8T346G9",
        "org.wireshark.Wireshark",
        "Level 1",
        "Level 2",
    ] {
        assert!(text.contains(fact), "{fact} missing:\n{text}");
    }
    // A request with one level done, for the picture.
    let (status, answer) = platform.call(
        "POST",
        &format!("/api/v1/admin/requests/{}/approve", first_id(&platform)),
        Some(&platform.admin_token),
        Some(&json!({})),
    );
    assert_eq!(status, 200, "{answer}");
    browser.goto(&format!("{base}/console/requests/{}", first_id(&platform)));
    browser.wait_for_text("1 of 1 approval", WAIT);
    // The picture: a request waiting for this approver, with its actions.
    browser.goto(&format!(
        "{base}/console/requests/{}",
        request_id(&platform, "mDNS")
    ));
    browser.wait_for_text("Approve at level 1", WAIT);
    browser.resize(1280, 1180);
    browser.screenshot_for_docs(&docs_image("console-request.png"));
    // On a phone.
    browser.resize(390, 844);
    browser.goto(&format!("{base}/console/inbox"));
    browser.wait_for_text("Waiting for you", WAIT);
    browser.screenshot_for_docs(&docs_image("console-phone.png"));
}

fn third_request(platform: &Platform, agent: &RestAgent) {
    ask(
        agent,
        platform,
        "three",
        "alice",
        "/Applications/Wireshark.app/Contents/MacOS/Wireshark",
        "Debug the printer's mDNS announcements on the office network",
    );
}

/// The id of alice's first request (local id "one").
fn first_id(platform: &Platform) -> String {
    request_id(platform, "INC-4411")
}

/// The id of the request whose justification holds `text`.
fn request_id(platform: &Platform, text: &str) -> String {
    platform
        .requests()
        .into_iter()
        .find(|r| r["justification"].as_str().unwrap().contains(text))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn a_policy_error_is_shown_at_its_rule_and_a_valid_policy_is_diffed_then_pushed() {
    if !browser_capable() {
        return;
    }
    let platform = platform_with(&[]);
    platform.push(
        &policy(
            1,
            "allow",
            &[r#"{"id": "no-nc", "action": "deny", "match": {"name": "nc"}}"#.to_owned()],
        ),
        &[],
    );
    let browser = Browser::start();
    let base = platform.url();
    browser.sign_in(&base, "e2e", PASSWORD);
    browser.wait_for_text("Inbox", WAIT);
    browser.goto(&format!("{base}/console/policies/edit?scope=general"));
    let broken = r#"{
  "version": 2,
  "default_action": "allow",
  "rules": [
    {"id": "no-nc", "action": "deny", "match": {"name": "nc"}},
    {
      "id": "bad-rule",
      "action": "maybe",
      "match": {"name": "tcpdump"}
    }
  ]
}"#;
    set_textarea(&browser, broken);
    browser.click("button.primary");
    browser.wait_for_text("nothing was pushed", WAIT);
    // The error sits right under the rule's line.
    let flagged = browser.text_of("tr.has-note");
    assert!(flagged.contains(r#""id": "bad-rule""#), "{flagged}");
    let note = browser.text_of("tr.has-note + tr.note");
    assert!(
        note.contains("bad-rule") && note.contains("maybe"),
        "{note}"
    );
    browser.screenshot_for_docs(&docs_image("console-policy-error.png"));

    // Fixed: the diff against the stored document, then the push.
    set_textarea(&browser, &broken.replace("maybe", "deny"));
    browser.click("button.primary");
    browser.wait_for_text("Review the changes", WAIT);
    assert!(
        browser.count("table.diff tr.ins") > 0,
        "the new rule shows as added"
    );
    browser.click("#push");
    browser.wait_for_text("Pushed", WAIT);
    let (status, stored) = platform.call(
        "GET",
        "/api/v1/admin/policies/general",
        Some(&platform.admin_token),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(stored["rules"][1]["id"], "bad-rule", "{stored}");
    assert_eq!(platform.activity_with("pushed general revision 2").len(), 1);
}

fn set_textarea(browser: &Browser, text: &str) {
    browser.execute(
        "document.querySelector('textarea[name=document]').value = arguments[0];",
        vec![Value::String(text.to_owned())],
    );
}

/// Enrollment tokens as the API lists them.
fn enroll_tokens(platform: &Platform) -> Vec<Value> {
    let (status, tokens) = platform.call(
        "GET",
        "/api/v1/admin/enroll-tokens",
        Some(&platform.admin_token),
        None,
    );
    assert_eq!(status, 200, "{tokens}");
    tokens.as_array().unwrap().clone()
}

#[test]
fn a_forged_csrf_token_a_missing_cookie_and_an_expired_session_change_nothing() {
    if !browser_capable() {
        return;
    }
    let platform = platform_with(&["--session-idle-timeout", "3s"]);
    let browser = Browser::start();
    let base = platform.url();
    let tokens_page = format!("{base}/console/enroll-tokens");
    browser.sign_in(&base, "e2e", PASSWORD);
    browser.wait_for_text("Inbox", WAIT);

    // A forged token in the form.
    browser.goto(&tokens_page);
    browser.execute(
            "document.querySelectorAll('input[name=csrf]').forEach(function (i) { i.value = 'forged'; });",
            vec![],
    );
    browser.click("form.filters button.primary");
    browser.wait_for_text("Form refused", WAIT);
    assert!(enroll_tokens(&platform).is_empty(), "nothing was made");

    // No session cookie.
    browser.goto(&tokens_page);
    browser.delete_cookie("__Host-epm-session");
    browser.click("form.filters button.primary");
    browser.wait_for_text("no session cookie was sent", WAIT);
    assert!(enroll_tokens(&platform).is_empty(), "nothing was made");

    // An expired session (idle for longer than 3 s).
    browser.sign_in(&base, "e2e", PASSWORD);
    browser.wait_for_text("Inbox", WAIT);
    browser.goto(&tokens_page);
    std::thread::sleep(Duration::from_secs(5));
    browser.click("form.filters button.primary");
    browser.wait_for_text("Your session expired", WAIT);
    assert!(enroll_tokens(&platform).is_empty(), "nothing was made");

    // The same form, in a live session, works.
    browser.sign_in(&base, "e2e", PASSWORD);
    browser.wait_for_text("Inbox", WAIT);
    browser.goto(&tokens_page);
    browser.click("form.filters button.primary");
    browser.wait_for_text("It is shown once", WAIT);
    assert_eq!(enroll_tokens(&platform).len(), 1);
}

/// `epmctl sync`, asserted.
fn synced(daemon: &Daemon) {
    let out = daemon.epmctl(&["sync"]);
    assert!(
        out.status.success(),
        "epmctl sync: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
}

/// Syncs until the platform holds a pending request; returns its id.
fn pending_on_platform(platform: &Platform, daemon: &Daemon) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        synced(daemon);
        if let Some(request) = platform
            .requests()
            .into_iter()
            .find(|r| r["state"] == "pending")
        {
            return request["id"].as_str().unwrap().to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pending request reached the platform:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn two_approvers_in_two_browsers_let_the_program_run_and_a_denial_reaches_the_user() {
    if !capable() || !browser_capable() {
        return;
    }
    let platform = platform_with(&[]);
    let user = TestUser::create("epcappr");
    let device = "epc-console-device";
    let daemon = Daemon::start_managed(device, &platform.agent_table());
    synced(&daemon);
    let tool = daemon.mount.install("/usr/bin/true", "capture");
    platform.push(
        &policy(
            1,
            "allow",
            &[approve_rule(
                "capture",
                &format!(r#"{{"path": "{}"}}"#, tool.display()),
                2,
                1,
            )],
        ),
        &["--device", device],
    );
    synced(&daemon);
    daemon.open_to_users();
    platform.admin_with("epc-one", &["--role", "approver", "--approver-level", "1"]);
    platform.admin_with("epc-two", &["--role", "approver", "--approver-level", "2"]);
    platform.set_password("epc-one", PASSWORD);
    platform.set_password("epc-two", PASSWORD);
    let base = platform.url();
    let (first, second) = (Browser::start(), Browser::start());
    first.sign_in(&base, "epc-one", PASSWORD);
    second.sign_in(&base, "epc-two", PASSWORD);
    first.wait_for_text("Waiting for you", WAIT);
    second.wait_for_text("Waiting for you", WAIT);

    // The user asks; the agent sends it; the open inbox shows it.
    assert!(denied(&user.run(&tool)), "refused until approved");
    let tool_arg = tool.to_str().unwrap();
    let asked = daemon.epmctl_as(
        &user,
        &["request", tool_arg, "--reason", "Capture for INC-7"],
    );
    assert!(asked.status.success(), "{}", output(&asked));
    let id = pending_on_platform(&platform, &daemon);
    first.wait_for_text("Capture for INC-7", WAIT);

    // Level 1 in the first browser.
    first.click(&format!("a[href=\"/console/requests/{id}\"]"));
    first.wait_for_text("Approve at level 1", WAIT);
    first.click("#approve");
    first.wait_for_text("Approved at your level.", WAIT);
    synced(&daemon);
    assert!(denied(&user.run(&tool)), "one level of two is not enough");

    // Level 2 in the second: the request now waits for it.
    second.goto(&format!("{base}/console/inbox"));
    second.click(&format!("tr.mine a[href=\"/console/requests/{id}\"]"));
    second.click("#approve");
    second.wait_for_text("every level has approved", WAIT);
    let text = second.text();
    assert!(
        text.contains("epc-one") && text.contains("epc-two"),
        "{text}"
    );
    synced(&daemon);
    assert!(ran(&user.run(&tool)), "approved by both levels: it runs");

    // A denial with a reason reaches the user's `epmctl requests`.
    let asked = daemon.epmctl_as(
        &user,
        &["request", tool_arg, "--reason", "One more capture"],
    );
    assert!(asked.status.success(), "{}", output(&asked));
    let id = pending_on_platform(&platform, &daemon);
    first.goto(&format!("{base}/console/requests/{id}"));
    first.fill("reason", "Use the jump host for captures");
    first.click("#deny");
    first.wait_for_text("Denied. The user will read your reason.", WAIT);
    synced(&daemon);
    let listed = daemon.epmctl_as(&user, &["requests"]);
    let listed = output(&listed);
    assert!(listed.contains("rejected"), "{listed}");
    assert!(
        listed.contains("Use the jump host for captures"),
        "{listed}"
    );
    assert_eq!(
        platform.activity_with("(console)").len(),
        3,
        "two approvals and a denial, logged"
    );
}
