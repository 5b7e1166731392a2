//! The console's HTML. maud escapes every `(value)` it is given, so text
//! from agents and users (justifications, paths, host names, audit
//! records) is shown as text, never run as markup; nothing here uses
//! `PreEscaped` on such text.

use axum::http::StatusCode;
use epm_api::admin::{AdminRequest, AdminRole};
use epm_api::agent::RequestState;
use jiff::Timestamp;
use maud::{DOCTYPE, Markup, html};

use crate::db::Admin;

/// What every signed-in page shows around its content.
#[derive(Debug)]
pub(super) struct Chrome<'a> {
    /// Who is signed in.
    pub(super) admin: &'a Admin,
    /// The session's CSRF token, for the forms.
    pub(super) csrf: &'a str,
    /// The admin's time zone.
    pub(super) zone: &'a jiff::tz::TimeZone,
    /// Its name.
    pub(super) zone_name: &'a str,
    /// Pending requests waiting for this admin's level (and theirs to
    /// approve).
    pub(super) mine: usize,
    /// Other pending requests.
    pub(super) others: usize,
}

/// The navigation's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Nav {
    /// Inbox.
    Inbox,
    /// History.
    History,
    /// Devices.
    Devices,
    /// Audit.
    Audit,
    /// Policies.
    Policies,
    /// Enrollment tokens.
    Enrollment,
    /// Admins.
    Admins,
    /// Activity.
    Activity,
    /// Webhooks.
    Webhooks,
    /// The admin's own account.
    Account,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="referrer" content="same-origin";
            title { (title) " · EPM console" }
            link rel="stylesheet" href="/console/static/app.css";
            link rel="icon" href="data:,";
            script src="/console/static/app.js" defer {}
        }
    }
}

/// The hidden CSRF field of a form.
pub(super) fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// A signed-in page.
pub(super) fn layout(chrome: &Chrome<'_>, title: &str, active: Nav, body: Markup) -> Markup {
    let entry = |nav: Nav, href: &str, label: &str, count: Option<Markup>| {
        html! {
            li {
                a href=(href) aria-current=[(nav == active).then_some("page")] {
                    span { (label) }
                    @if let Some(count) = count { (count) }
                }
            }
        }
    };
    let counts = html! {
        span.counts {
            span #count-mine .count.mine title="Waiting for your level" { @if chrome.mine > 0 { (chrome.mine) } }
            span #count-others .count title="Other pending requests" { @if chrome.others > 0 { (chrome.others) } }
        }
    };
    let admin = chrome.admin;
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/console/inbox" { span.logo aria-hidden="true" { "◆" } " EPM" }
                    nav aria-label="Main" {
                        ul {
                            (entry(Nav::Inbox, "/console/inbox", "Inbox", Some(counts)))
                            (entry(Nav::History, "/console/history", "History", None))
                            (entry(Nav::Devices, "/console/devices", "Devices", None))
                            (entry(Nav::Audit, "/console/audit", "Audit", None))
                            (entry(Nav::Policies, "/console/policies", "Policies", None))
                            (entry(Nav::Enrollment, "/console/enroll-tokens", "Enrollment", None))
                            (entry(Nav::Admins, "/console/admins", "Admins", None))
                            (entry(Nav::Activity, "/console/activity", "Activity", None))
                            (entry(Nav::Webhooks, "/console/webhooks", "Webhooks", None))
                        }
                    }
                    div.who {
                        a href="/console/account" aria-current=[(active == Nav::Account).then_some("page")] {
                            strong { (admin.name) }
                            span.role { (role_text(admin)) }
                        }
                        form method="post" action="/console/sign-out" {
                            (csrf_field(chrome.csrf))
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main #main tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
                footer {
                    "Times in " (chrome.zone_name) @if chrome.zone_name != "UTC" { " and UTC" } " · "
                    a href="/api/v1/openapi.json" { "REST API" }
                }
            }
        }
    }
}

/// An admin's role in words.
pub(super) fn role_text(admin: &Admin) -> String {
    match (admin.role, admin.approver_level) {
        (AdminRole::Owner, Some(l)) => format!("owner · approves at level {l}"),
        (AdminRole::Approver, Some(l)) => format!("approver · level {l}"),
        (role, _) => role.as_str().replace('_', " "),
    }
}

/// A page outside a session: sign-in, refusals.
pub(super) fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.bare {
                main #main {
                    div.card.narrow {
                        a.brand href="/console/inbox" { span.logo aria-hidden="true" { "◆" } " EPM" }
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
    }
}

/// The page of a refusal or failure.
pub(super) fn refusal_page(title: &str, message: &str, status: StatusCode) -> Markup {
    bare(
        title,
        html! {
            p.alert.error role="alert" { (message) }
            p.muted { "HTTP " (status.as_u16()) }
            p { a href="/console/inbox" { "Back to the inbox" } " · " a href="/console/sign-in" { "Sign in" } }
        },
    )
}

/// Why a session is gone, in words.
pub(super) fn why_signed_out(why: &str) -> String {
    match why {
        "idle" => "Your session expired: it was not used for too long. Sign in again; nothing was changed.".into(),
        "lifetime" => "Your session reached its maximum age. Sign in again; nothing was changed.".into(),
        "disabled" => "Your admin account is disabled.".into(),
        "unknown" => "Your session has ended (signed out, or signed out everywhere). Sign in again; nothing was changed.".into(),
        _ => "You are not signed in (no session cookie was sent). Sign in; nothing was changed.".into(),
    }
}

/// The sign-in page.
pub(super) fn sign_in(csrf: &str, name: &str, message: Option<&str>, error: bool) -> Markup {
    bare(
        "Sign in",
        html! {
            @if let Some(message) = message {
                p.alert.(if error { "error" } else { "info" }) role="alert" { (message) }
            }
            form.stack method="post" action="/console/sign-in" {
                (csrf_field(csrf))
                input type="hidden" name="tz" value="" data-fill="time-zone";
                label { "Admin name" input name="name" value=(name) autocomplete="username" required autofocus[name.is_empty()]; }
                label { "Password" input type="password" name="password" autocomplete="current-password" required autofocus[!name.is_empty()]; }
                label { "Authenticator code " span.muted { "(if you turned TOTP on)" }
                    input name="code" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9 ]*" maxlength="8"; }
                button.primary type="submit" { "Sign in" }
            }
            p.muted.small { "Passwords are set with " code { "epm-platform admin set-password" } "." }
        },
    )
}

/// A time in the admin's zone, with UTC and how long ago in its title.
pub(super) fn when(chrome: &Chrome<'_>, ts: Timestamp) -> Markup {
    let local = ts.to_zoned(chrome.zone.clone());
    html! {
        time datetime=(ts.to_string()) title=(format!("{} UTC", ts.strftime("%Y-%m-%d %H:%M:%S"))) {
            (local.strftime("%Y-%m-%d %H:%M").to_string())
        }
        " " span.rel data-rel=(ts.as_second()) { (relative(ts)) }
    }
}

/// A time in the admin's zone and in UTC, both written out.
pub(super) fn when_both(chrome: &Chrome<'_>, ts: Timestamp) -> Markup {
    let local = ts.to_zoned(chrome.zone.clone());
    html! {
        time datetime=(ts.to_string()) { (local.strftime("%a %Y-%m-%d %H:%M %Z").to_string()) }
        @if chrome.zone_name != "UTC" {
            span.muted { " · " (ts.strftime("%H:%M UTC").to_string()) }
        }
        " " span.rel data-rel=(ts.as_second()) { (relative(ts)) }
    }
}

/// "3 min ago", "in 2 h".
pub(super) fn relative(ts: Timestamp) -> String {
    let seconds = Timestamp::now().as_second() - ts.as_second();
    let (n, future) = (seconds.unsigned_abs(), seconds < 0);
    let amount = match n {
        0..=44 => {
            return if future {
                "in a moment".into()
            } else {
                "just now".into()
            };
        }
        45..=3_599 => format!("{} min", n.div_ceil(60)),
        3_600..=86_399 => format!("{} h", n / 3_600),
        _ => format!("{} d", n / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// A request's state as a badge.
pub(super) fn state_badge(state: RequestState) -> Markup {
    html! { span class=(format!("badge {}", state.as_str())) { (state.as_str()) } }
}

/// A decision as a badge.
pub(super) fn decision_badge(decision: &str) -> Markup {
    let class = match decision {
        "allow" => "badge approved",
        "deny" => "badge denied",
        "would_deny" => "badge pending",
        _ => "badge",
    };
    html! { span class=(class) { (decision) } }
}

/// The levels of a request: each with who approved and when.
pub(super) fn levels(chrome: &Chrome<'_>, request: &AdminRequest) -> Markup {
    html! {
        ol.levels {
            @for (index, needed) in request.levels.iter().enumerate() {
                @let level = index as u32 + 1;
                @let given: Vec<_> = request.approvals.iter().filter(|a| a.level == level).collect();
                @let status = if given.len() as u32 >= *needed { "done" }
                    else if request.state == RequestState::Pending && request.current_level == level { "waiting" }
                    else { "open" };
                li class=(status) {
                    div.level-head {
                        strong { "Level " (level) }
                        span.muted { " · " (given.len()) " of " (needed) " approval" @if *needed != 1 { "s" } }
                        @if status == "waiting" { span.badge.pending { "waiting" } }
                    }
                    @for approval in &given {
                        div.small { "✓ " strong { (approval.admin) } " · " (when(chrome, approval.at)) }
                    }
                }
            }
        }
    }
}

/// One row of a request list.
pub(super) fn request_row(chrome: &Chrome<'_>, request: &AdminRequest, mine: bool) -> Markup {
    html! {
        tr.mine[mine] {
            td { a href=(format!("/console/requests/{}", request.id)) { strong { (request.user) } } div.small.muted { (request.id) } }
            td.device { (request.device_id) }
            td.path { span.mono { (request.subject.path) } div.small.muted { "rule " (request.rule_id) } }
            td.just { (request.justification) }
            td { (state_badge(request.state))
                @if request.state == RequestState::Pending {
                    div.small.muted { "level " (request.current_level) " of " (request.levels.len()) }
                }
            }
            td.nowrap { (when(chrome, request.created_at)) }
        }
    }
}

/// A table of requests.
pub(super) fn request_table(
    chrome: &Chrome<'_>,
    requests: &[(AdminRequest, bool)],
    empty: &str,
) -> Markup {
    html! {
        @if requests.is_empty() {
            p.empty { (empty) }
        } @else {
            div.table-wrap {
                table {
                    thead { tr { th { "User" } th { "Device" } th { "Program" } th { "Justification" } th { "State" } th { "Asked" } } }
                    tbody {
                        @for (request, mine) in requests { (request_row(chrome, request, *mine)) }
                    }
                }
            }
        }
    }
}

/// A notice after an action, or an error in words.
pub(super) fn notice(done: Option<&str>, error: Option<&str>) -> Markup {
    html! {
        @if let Some(error) = error { p.alert.error role="alert" { (error) } }
        @if let Some(done) = done { p.alert.ok role="status" { (done) } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use epm_api::SubjectIdentity;
    use epm_api::agent::{RequestSubject, Window};

    #[test]
    fn text_from_agents_and_users_is_escaped() {
        let admin = Admin {
            name: "alice".into(),
            role: AdminRole::Approver,
            approver_level: Some(1),
            endpoint_users: vec!["alice".into()],
        };
        let chrome = Chrome {
            admin: &admin,
            csrf: "t",
            zone: &jiff::tz::TimeZone::UTC,
            zone_name: "UTC",
            mine: 0,
            others: 0,
        };
        let now = Timestamp::now();
        let request = AdminRequest {
            id: "req_1".into(),
            device_id: "<img src=x onerror=alert(1)>".into(),
            user: "bob\"><script>alert(2)</script>".into(),
            rule_id: "r".into(),
            subject: RequestSubject {
                identity: SubjectIdentity {
                    kind: "sha256".into(),
                    value: "ab".repeat(32),
                },
                path: "/tmp/<b>x</b>".into(),
                team_id: None,
                signing_id: None,
            },
            justification: "<script>alert('pwned')</script>".into(),
            window: Window {
                start: now,
                end: now,
            },
            state: RequestState::Pending,
            levels: vec![1],
            current_level: 1,
            approvals: vec![],
            reason: None,
            decided_by: None,
            created_at: now,
            updated_at: now,
        };
        let html = request_table(&chrome, &[(request, true)], "none").into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert('pwned')&lt;/script&gt;"),
            "{html}"
        );
        assert!(html.contains("bob&quot;&gt;&lt;script&gt;"), "{html}");
    }
}
