//! What the web console needs from the database: admins' passwords and
//! TOTP secrets, sign-in sessions, filtered and paged views of requests,
//! the fleet's audit and the activity log, and the webhooks' outbox. The
//! rules (who may do what) stay where the API's are: [`crate::roles`] and
//! the methods of [`Db`] both front ends call.

use super::sql::{self, Conn, OptionalExtension, Row, params};
use epm_api::admin::{Activity, AdminRequest};
use epm_api::agent::RequestState;
use jiff::Timestamp;

use super::{Admin, Db, DbError, Result, admin_info, new_id, secret_hash, sortable, ts};
use crate::roles::Capability;

/// A signed-in console session, as the database keeps it.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// The admin, enabled.
    pub admin: Admin,
    /// When the session began.
    pub created_at: Timestamp,
    /// The last request made with it.
    pub last_seen: Timestamp,
    /// The time zone the browser reported at sign-in (IANA name), if any.
    pub time_zone: Option<String>,
}

/// Why a session cookie no longer signs anyone in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// No such session: never made, signed out, or ended everywhere.
    Unknown,
    /// Unused for longer than the idle timeout.
    Idle,
    /// Older than the absolute lifetime.
    Lifetime,
    /// The admin was disabled.
    Disabled,
}

/// What a sign-in attempt finds of an account.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The admin; `None` when disabled.
    pub admin: Option<Admin>,
    /// Its argon2id hash in PHC form; `None` when no password is set.
    pub password_hash: Option<String>,
    /// Its TOTP secret (base32), when TOTP is on.
    pub totp_secret: Option<String>,
    /// The last TOTP time step accepted (a code is accepted once).
    pub totp_last_step: Option<u64>,
}

/// Filters of the console's request history.
#[derive(Debug, Clone, Default)]
pub struct RequestFilter {
    /// Only this state.
    pub state: Option<RequestState>,
    /// Only this endpoint user.
    pub user: Option<String>,
    /// Only this device.
    pub device: Option<String>,
    /// Only this rule.
    pub rule: Option<String>,
    /// Submitted at or after.
    pub from: Option<Timestamp>,
    /// Submitted before.
    pub to: Option<Timestamp>,
}

/// Filters of the console's audit view and its exports.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this decision (`allow`, `deny`, `would_deny`).
    pub decision: Option<String>,
    /// Only this device.
    pub device: Option<String>,
    /// Only this user.
    pub user: Option<String>,
    /// Only this rule.
    pub rule: Option<String>,
    /// Sealed at or after.
    pub from: Option<Timestamp>,
    /// Sealed before.
    pub to: Option<Timestamp>,
    /// Only records whose JSON holds this text (any case).
    pub text: Option<String>,
}

/// One stored audit record of the fleet.
#[derive(Debug, Clone)]
pub struct AuditRow {
    /// The platform's cursor.
    pub cursor: u64,
    /// The device it came from.
    pub device_id: String,
    /// The record as the agent wrote it.
    pub record: String,
}

/// A webhook, without its secret.
#[derive(Debug, Clone)]
pub struct WebhookInfo {
    /// `whk_…`.
    pub id: String,
    /// Where deliveries go.
    pub url: String,
    /// Who made it.
    pub created_by: String,
    /// When.
    pub created_at: Timestamp,
}

/// One delivery of an event to a webhook.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Order.
    pub id: u64,
    /// The webhook.
    pub webhook_id: String,
    /// Where it goes (the webhook's URL).
    pub url: String,
    /// The webhook's secret, for the signature (only for sending).
    pub secret: String,
    /// `request.created`, `request.approved`, `request.denied`,
    /// `request.expired`, `request.revoked`.
    pub event: String,
    /// The request.
    pub request_id: String,
    /// The JSON body, signed as is.
    pub body: String,
    /// `pending`, `delivered` or `failed` (given up).
    pub state: String,
    /// Tries so far.
    pub attempts: u32,
    /// The next try.
    pub next_at: Timestamp,
    /// The last answer's status.
    pub last_status: Option<u16>,
    /// The last failure, in words.
    pub last_error: Option<String>,
    /// Queued.
    pub created_at: Timestamp,
}

/// Tries before a delivery is given up.
pub const MAX_DELIVERY_ATTEMPTS: u32 = 8;

/// Sessions one admin may hold; signing in past it ends the oldest.
const MAX_SESSIONS_PER_ADMIN: u32 = 16;

/// The console's request for one event: `created`, `approved`, …
pub(super) fn enqueue_webhooks(
    tx: &Conn<'_>,
    console_url: &str,
    event: &str,
    request: &AdminRequest,
) -> Result<()> {
    let has_hooks: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM webhooks WHERE disabled_by IS NULL)",
        params![],
        |r| r.get(0),
    )?;
    if !has_hooks {
        return Ok(());
    }
    let body = serde_json::json!({
        "event": format!("request.{event}"),
        "at": Timestamp::now(),
        "link": format!("{}/console/requests/{}", console_url.trim_end_matches('/'), request.id),
        "request": request,
    })
    .to_string();
    let now = sortable(Timestamp::now());
    tx.execute(
        "INSERT INTO webhook_deliveries (webhook_id, event, request_id, body, state, attempts, next_at, created_at)
         SELECT id, ?1, ?2, ?3, 'pending', 0, ?4, ?4 FROM webhooks WHERE disabled_by IS NULL",
        params![format!("request.{event}"), request.id, body, now],
    )?;
    Ok(())
}

fn delivery(r: &Row) -> sql::Result<Delivery> {
    Ok(Delivery {
        id: r.get(0)?,
        webhook_id: r.get(1)?,
        url: r.get(2)?,
        secret: r.get(3)?,
        event: r.get(4)?,
        request_id: r.get(5)?,
        body: r.get(6)?,
        state: r.get(7)?,
        attempts: r.get(8)?,
        next_at: ts(r, 9)?,
        last_status: r.get(10)?,
        last_error: r.get(11)?,
        created_at: ts(r, 12)?,
    })
}

const DELIVERY_COLUMNS: &str = "d.id, d.webhook_id, w.url, w.secret, d.event, d.request_id, d.body, d.state, d.attempts, d.next_at, d.last_status, d.last_error, d.created_at";

impl Db {
    // ---- passwords and TOTP ---------------------------------------------

    /// What a sign-in as `name` is checked against; `None` for no such
    /// admin.
    pub fn credentials(&self, name: &str) -> Result<Option<Credentials>> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT name, role, approver_level, endpoint_users, disabled_by, created_at, password_hash, totp_secret, totp_last_step FROM admins WHERE name = ?1",
                [name],
                |r| {
                    let info = admin_info(r)?;
                    let disabled: Option<String> = r.get(4)?;
                    Ok(Credentials {
                        admin: disabled.is_none().then_some(Admin {
                            name: info.name,
                            role: info.role,
                            approver_level: info.approver_level,
                            endpoint_users: info.endpoint_users,
                        }),
                        password_hash: r.get(6)?,
                        totp_secret: r.get(7)?,
                        totp_last_step: r.get(8)?,
                    })
                },
            )
            .optional()?)
    }

    /// Sets `name`'s console password (an argon2id PHC string made by the
    /// caller) and ends every session it has but the one of cookie `keep`.
    /// The owner sets anyone's, every admin their own; `None` is the
    /// offline CLI.
    pub fn set_password(
        &self,
        by: Option<&Admin>,
        name: &str,
        phc: &str,
        keep: Option<&str>,
    ) -> Result<()> {
        if let Some(by) = by
            && by.name != name
        {
            by.require(Capability::ManageAdmins)?;
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE admins SET password_hash = ?2 WHERE name = ?1",
            params![name, phc],
        )?;
        if changed == 0 {
            return Err(DbError::NotFound(format!("no admin {name:?}")));
        }
        tx.execute(
            "DELETE FROM console_sessions WHERE admin = ?1 AND token_sha256 IS DISTINCT FROM ?2",
            params![name, keep.map(secret_hash)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Turns TOTP on with `secret` (base32), or off with `None`, for
    /// `name` (the owner for anyone, every admin for themselves); ends its
    /// sessions.
    pub fn set_totp(&self, by: Option<&Admin>, name: &str, secret: Option<&str>) -> Result<()> {
        if let Some(by) = by
            && by.name != name
        {
            by.require(Capability::ManageAdmins)?;
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE admins SET totp_secret = ?2, totp_last_step = NULL WHERE name = ?1",
            params![name, secret],
        )?;
        if changed == 0 {
            return Err(DbError::NotFound(format!("no admin {name:?}")));
        }
        tx.execute("DELETE FROM console_sessions WHERE admin = ?1", [name])?;
        tx.commit()?;
        Ok(())
    }

    /// Records that the TOTP code of `step` was used: `false` when that
    /// step (or a later one) was used already, so a code works once.
    pub fn use_totp_step(&self, name: &str, step: u64) -> Result<bool> {
        Ok(self.conn()?.execute(
            "UPDATE admins SET totp_last_step = ?2 WHERE name = ?1 AND (totp_last_step IS NULL OR totp_last_step < ?2)",
            params![name, step],
        )? == 1)
    }

    /// Which admins have a password and TOTP set: (name, password, totp).
    pub fn sign_in_methods(&self) -> Result<Vec<(String, bool, bool)>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT name, password_hash IS NOT NULL, totp_secret IS NOT NULL FROM admins ORDER BY name",
        )?;
        let rows = stmt.query_map(params![], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    // ---- sessions -----------------------------------------------------

    /// Starts a session for `admin` under the cookie `token` (only its hash
    /// is stored). Past `MAX_SESSIONS_PER_ADMIN` (16) the oldest ends.
    pub fn create_session(
        &self,
        admin: &str,
        token: &str,
        source: &str,
        time_zone: Option<&str>,
    ) -> Result<()> {
        let now = sortable(Timestamp::now());
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO console_sessions (token_sha256, admin, created_at, last_seen, source, time_zone) VALUES (?1, ?2, ?3, ?3, ?4, ?5)",
            params![secret_hash(token), admin, now, source, time_zone],
        )?;
        tx.execute(
            "DELETE FROM console_sessions WHERE admin = ?1 AND rowid NOT IN (SELECT rowid FROM console_sessions WHERE admin = ?1 ORDER BY created_at DESC LIMIT ?2)",
            params![admin, MAX_SESSIONS_PER_ADMIN],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The session of cookie `token`, if it still signs its admin in: used
    /// within `idle` and younger than `lifetime`, its admin enabled. A live
    /// session's last use becomes now when `touch` (not for a page's
    /// background polls).
    pub fn session(
        &self,
        token: &str,
        idle: std::time::Duration,
        lifetime: std::time::Duration,
        touch: bool,
    ) -> Result<std::result::Result<SessionRow, SessionEnd>> {
        let hash = secret_hash(token);
        let conn = self.conn()?;
        let found = conn
            .query_row(
                "SELECT a.name, a.role, a.approver_level, a.endpoint_users, a.disabled_by, a.created_at, s.created_at, s.last_seen, s.time_zone
                 FROM console_sessions s JOIN admins a ON a.name = s.admin WHERE s.token_sha256 = ?1",
                [&hash],
                |r| {
                    let info = admin_info(r)?;
                    Ok((
                        info,
                        r.get::<_, Option<String>>(4)?.is_some(),
                        ts(r, 6)?,
                        ts(r, 7)?,
                        r.get::<_, Option<String>>(8)?,
                    ))
                },
            )
            .optional()?;
        let Some((info, disabled, created_at, last_seen, time_zone)) = found else {
            return Ok(Err(SessionEnd::Unknown));
        };
        let now = Timestamp::now();
        let older = |since: Timestamp, limit: std::time::Duration| {
            jiff::SignedDuration::try_from(limit)
                .is_ok_and(|limit| since.duration_until(now) > limit)
        };
        let end = if disabled {
            Some(SessionEnd::Disabled)
        } else if older(created_at, lifetime) {
            Some(SessionEnd::Lifetime)
        } else if older(last_seen, idle) {
            Some(SessionEnd::Idle)
        } else {
            None
        };
        // An ended session stays refused until `prune_sessions` forgets it,
        // so the admin is told why (idle, too old) rather than "unknown".
        if let Some(end) = end {
            return Ok(Err(end));
        }
        if touch {
            conn.execute(
                "UPDATE console_sessions SET last_seen = ?2 WHERE token_sha256 = ?1",
                params![hash, sortable(now)],
            )?;
        }
        Ok(Ok(SessionRow {
            admin: Admin {
                name: info.name,
                role: info.role,
                approver_level: info.approver_level,
                endpoint_users: info.endpoint_users,
            },
            created_at,
            last_seen: if touch { now } else { last_seen },
            time_zone,
        }))
    }

    /// Ends one session.
    pub fn end_session(&self, token: &str) -> Result<()> {
        self.conn()?.execute(
            "DELETE FROM console_sessions WHERE token_sha256 = ?1",
            [secret_hash(token)],
        )?;
        Ok(())
    }

    /// Ends every session of `admin`; returns how many.
    pub fn end_sessions(&self, admin: &str) -> Result<usize> {
        Ok(self
            .conn()?
            .execute("DELETE FROM console_sessions WHERE admin = ?1", [admin])?)
    }

    /// Forgets sessions unused for `idle` or older than `lifetime`.
    pub fn prune_sessions(
        &self,
        idle: std::time::Duration,
        lifetime: std::time::Duration,
    ) -> Result<usize> {
        let now = Timestamp::now();
        let before = |d: std::time::Duration| {
            sortable(
                jiff::SignedDuration::try_from(d)
                    .ok()
                    .and_then(|d| now.checked_sub(d).ok())
                    .unwrap_or(Timestamp::MIN),
            )
        };
        Ok(self.conn()?.execute(
            "DELETE FROM console_sessions WHERE last_seen < ?1 OR created_at < ?2",
            params![before(idle), before(lifetime)],
        )?)
    }

    // ---- requests -----------------------------------------------------

    /// Requests matching `filter`, newest first: `limit` of them after
    /// skipping `offset`, and how many match in all.
    pub fn request_page(
        &self,
        filter: &RequestFilter,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<AdminRequest>, u64)> {
        let conn = self.conn()?;
        let clause = "(?1 IS NULL OR state = ?1) AND (?2 IS NULL OR \"user\" = ?2) AND (?3 IS NULL OR device_id = ?3) AND (?4 IS NULL OR rule_id = ?4)
             AND (?5 IS NULL OR julianday(created_at) >= julianday(?5)) AND (?6 IS NULL OR julianday(created_at) < julianday(?6))";
        let args = params![
            filter.state.map(RequestState::as_str),
            filter.user,
            filter.device,
            filter.rule,
            filter.from.map(|t| t.to_string()),
            filter.to.map(|t| t.to_string()),
        ];
        let total: u64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM requests WHERE {clause}"),
            args,
            |r| r.get(0),
        )?;
        let ids: Vec<String> = {
            let mut stmt = conn.prepare(&format!(
                "SELECT id FROM requests WHERE {clause} ORDER BY julianday(created_at) DESC, id LIMIT ?7 OFFSET ?8"
            ))?;
            stmt.query_map(
                params![
                    filter.state.map(RequestState::as_str),
                    filter.user,
                    filter.device,
                    filter.rule,
                    filter.from.map(|t| t.to_string()),
                    filter.to.map(|t| t.to_string()),
                    limit,
                    offset
                ],
                |r| r.get(0),
            )?
            .collect::<sql::Result<_>>()?
        };
        let requests = ids
            .iter()
            .map(|id| Ok(Db::request_row(&conn, id)?.request))
            .collect::<Result<Vec<_>>>()?;
        Ok((requests, total))
    }

    /// Pending requests, oldest first (the inbox).
    pub fn pending_requests(&self) -> Result<Vec<AdminRequest>> {
        let conn = self.conn()?;
        let ids: Vec<String> = {
            let mut stmt = conn.prepare(
                "SELECT id FROM requests WHERE state = 'pending' ORDER BY julianday(created_at), id LIMIT 1000",
            )?;
            stmt.query_map(params![], |r| r.get(0))?
                .collect::<sql::Result<_>>()?
        };
        ids.iter()
            .map(|id| Ok(Db::request_row(&conn, id)?.request))
            .collect()
    }

    /// A fingerprint of what the inbox shows: the pending requests, the
    /// level each waits for and every approval given. It changes when a
    /// request arrives, moves on a level or leaves the inbox, so a page
    /// knows when to refresh (and only then).
    pub fn requests_stamp(&self) -> Result<String> {
        use sha2::Digest as _;
        let text: String = self.conn()?.query_row(
            "SELECT COALESCE((SELECT group_concat(id || ':' || current_level, ',') FROM (SELECT id, current_level FROM requests WHERE state = 'pending' ORDER BY id) AS pending), '')
                    || '/' || (SELECT COUNT(*) FROM approvals)", params![],
            |r| r.get(0),
        )?;
        Ok(hex::encode(&sha2::Sha256::digest(text.as_bytes())[..12]))
    }

    // ---- audit --------------------------------------------------------

    /// Audit records matching `filter`, newest first, before cursor
    /// `before` (all when `None`), at most `limit`.
    pub fn audit_page(
        &self,
        filter: &AuditFilter,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditRow>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT cursor, device_id, record FROM audit
             WHERE (?1 IS NULL OR cursor < ?1) AND (?2 IS NULL OR cursor > ?2)
               AND (?3 IS NULL OR decision = ?3) AND (?4 IS NULL OR device_id = ?4)
               AND (?5 IS NULL OR json_extract(record, '$.user') = ?5)
               AND (?6 IS NULL OR json_extract(record, '$.rule_id') = ?6)
               AND (?7 IS NULL OR julianday(json_extract(record, '$.time')) >= julianday(?7))
               AND (?8 IS NULL OR julianday(json_extract(record, '$.time')) < julianday(?8))
               AND (?9 IS NULL OR instr(lower(record), lower(?9)) > 0)
             ORDER BY cursor DESC LIMIT ?10",
        )?;
        let rows = stmt.query_map(
            params![
                before,
                after,
                filter.decision,
                filter.device,
                filter.user,
                filter.rule,
                filter.from.map(|t| t.to_string()),
                filter.to.map(|t| t.to_string()),
                filter.text,
                limit
            ],
            |r| {
                Ok(AuditRow {
                    cursor: r.get(0)?,
                    device_id: r.get(1)?,
                    record: r.get(2)?,
                })
            },
        )?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// One audit record by its cursor.
    pub fn audit_record(&self, cursor: u64) -> Result<AuditRow> {
        self.conn()?
            .query_row(
                "SELECT cursor, device_id, record FROM audit WHERE cursor = ?1",
                [cursor],
                |r| {
                    Ok(AuditRow {
                        cursor: r.get(0)?,
                        device_id: r.get(1)?,
                        record: r.get(2)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| DbError::NotFound(format!("no audit record {cursor}")))
    }

    /// A device's newest records for one user and program (its SHA-256 or
    /// its path), newest first.
    pub fn audit_for_subject(
        &self,
        device_id: &str,
        user: &str,
        sha256: Option<&str>,
        path: &str,
        limit: u32,
    ) -> Result<Vec<AuditRow>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT cursor, device_id, record FROM audit WHERE device_id = ?1 AND json_extract(record, '$.user') = ?2
               AND (json_extract(record, '$.path') = ?4 OR (?3 IS NOT NULL AND json_extract(record, '$.sha256') = ?3))
             ORDER BY cursor DESC LIMIT ?5",
        )?;
        let rows = stmt.query_map(params![device_id, user, sha256, path, limit], |r| {
            Ok(AuditRow {
                cursor: r.get(0)?,
                device_id: r.get(1)?,
                record: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    // ---- activity -----------------------------------------------------

    /// Activity entries, newest first, before id `before`, `admin`'s only
    /// when given.
    pub fn activity_page(
        &self,
        admin: Option<&str>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Activity>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, at, admin, call, status, detail FROM activity WHERE (?1 IS NULL OR admin = ?1) AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![admin, before, limit], |r| {
            Ok(Activity {
                id: r.get(0)?,
                at: ts(r, 1)?,
                admin: r.get(2)?,
                call: r.get(3)?,
                status: r.get(4)?,
                detail: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    // ---- webhooks -----------------------------------------------------

    /// Adds a webhook (owner only); returns its id and secret.
    pub fn create_webhook(&self, by: &Admin, url: &str) -> Result<(String, String)> {
        by.require(Capability::ManageAdmins)?;
        let id = new_id("whk_");
        let secret = super::new_token("whs_");
        self.conn()?.execute(
            "INSERT INTO webhooks (id, url, secret, created_by, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, url, secret, by.name, sortable(Timestamp::now())],
        )?;
        Ok((id, secret))
    }

    /// Removes a webhook and its pending deliveries (owner only).
    pub fn delete_webhook(&self, by: &Admin, id: &str) -> Result<()> {
        by.require(Capability::ManageAdmins)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        if tx.execute("DELETE FROM webhooks WHERE id = ?1", [id])? == 0 {
            return Err(DbError::NotFound(format!("no webhook {id:?}")));
        }
        tx.execute(
            "UPDATE webhook_deliveries SET state = 'failed', last_error = 'the webhook was removed' WHERE webhook_id = ?1 AND state = 'pending'",
            [id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Every webhook.
    pub fn webhooks(&self) -> Result<Vec<WebhookInfo>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, url, created_by, created_at FROM webhooks WHERE disabled_by IS NULL ORDER BY created_at",
        )?;
        let rows = stmt.query_map(params![], |r| {
            Ok(WebhookInfo {
                id: r.get(0)?,
                url: r.get(1)?,
                created_by: r.get(2)?,
                created_at: ts(r, 3)?,
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Deliveries whose next try is due, oldest first.
    pub fn due_deliveries(&self, limit: u32) -> Result<Vec<Delivery>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
             WHERE d.state = 'pending' AND d.next_at <= ?1 ORDER BY d.next_at LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![sortable(Timestamp::now()), limit], delivery)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// The newest deliveries (the delivery log), secrets blanked.
    pub fn deliveries(&self, limit: u32) -> Result<Vec<Delivery>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d LEFT JOIN webhooks w ON w.id = d.webhook_id ORDER BY d.id DESC LIMIT ?1"
        ))?;
        let rows = stmt.query_map([limit], |r| {
            Ok(Delivery {
                url: r
                    .get::<_, Option<String>>(2)?
                    .unwrap_or_else(|| "(removed)".into()),
                ..delivery_loose(r)?
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Records one try: delivered, or failed with the next try at
    /// `retry_at` (`None`: given up).
    pub fn record_delivery(
        &self,
        id: u64,
        status: Option<u16>,
        error: Option<&str>,
        retry_at: Option<Timestamp>,
    ) -> Result<()> {
        let delivered = error.is_none();
        let state = match (delivered, retry_at) {
            (true, _) => "delivered",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        self.conn()?.execute(
            "UPDATE webhook_deliveries SET state = ?2, attempts = attempts + 1, last_status = ?3, last_error = ?4, next_at = COALESCE(?5, next_at), delivered_at = CASE WHEN ?2 = 'delivered' THEN ?6 END WHERE id = ?1",
            params![id, state, status, error, retry_at.map(sortable), sortable(Timestamp::now())],
        )?;
        Ok(())
    }
}

/// A delivery row whose webhook may be gone (url and secret columns
/// nullable).
fn delivery_loose(r: &Row) -> sql::Result<Delivery> {
    Ok(Delivery {
        id: r.get(0)?,
        webhook_id: r.get(1)?,
        url: String::new(),
        secret: String::new(),
        event: r.get(4)?,
        request_id: r.get(5)?,
        body: r.get(6)?,
        state: r.get(7)?,
        attempts: r.get(8)?,
        next_at: ts(r, 9)?,
        last_status: r.get(10)?,
        last_error: r.get(11)?,
        created_at: ts(r, 12)?,
    })
}
