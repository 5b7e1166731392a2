//! Offline approval: a challenge the user reads to an administrator, and
//! the code the administrator's console gives back, which becomes a grant
//! without the platform being reachable.

use super::*;

impl Flows {
    /// [`epm_ipc::Request::OfflineChallenge`].
    pub(crate) fn offline_challenge(
        &self,
        caller: u32,
        path: String,
        reason: &str,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Challenge, Refused> {
        self.offline_key()?;
        let target = self.target(caller, None, Some(path))?;
        if target.action != Action::Approve {
            return Err(wrong_flow(&target));
        }
        let reason = self.check_approval_answer(&target, reason, start, end)?;
        let challenge = OfflineChallenge {
            device_id: self.device_id.clone(),
            user: target.user.clone(),
            identity: epm_api::SubjectIdentity {
                kind: target.identity.kind.as_str().to_owned(),
                value: target.identity.value.to_ascii_lowercase(),
            },
            rule_id: target.rule_id.clone(),
            not_before: start,
            not_after: end,
            nonce: rand::random(),
        };
        let text = challenge.encode();
        self.lock_store()?
            .insert_offline_challenge(&OfflineChallengeRecord {
                nonce: challenge.nonce.to_string(),
                uid: target.uid,
                challenge: text.clone(),
                not_after: end,
                created_at: self.clock.now(),
            })
            .map_err(internal)?;
        self.audit.send(
            flow_event("offline_challenge", &target, Some(&reason))
                .with_detail("nonce", challenge.nonce.to_string())
                .with_detail("window_start", start.to_string())
                .with_detail("window_end", end.to_string()),
        );
        Ok(Challenge {
            text,
            device_id: self.device_id.clone(),
        })
    }

    /// [`epm_ipc::Request::OfflineCode`].
    pub(crate) fn offline_code(&self, caller: u32, code: &str) -> Result<GrantInfo, Refused> {
        let key = self.offline_key()?;
        {
            let mut failures = lock(&self.offline_failures);
            let mine = failures.entry(caller).or_default();
            while mine
                .front()
                .is_some_and(|at| at.elapsed() >= OFFLINE_TRY_WINDOW)
            {
                mine.pop_front();
            }
            if mine.len() >= OFFLINE_MAX_TRIES {
                let wait = mine.front().map_or(OFFLINE_TRY_WINDOW, |at| {
                    OFFLINE_TRY_WINDOW.saturating_sub(at.elapsed())
                });
                return Err(GrantError::TryLater(format!(
                    "too many wrong codes; try again in {} minutes",
                    wait.as_secs().div_ceil(60).max(1)
                )));
            }
        }
        let now = self.clock.now();
        let open = self
            .lock_store()?
            .open_offline_challenges(caller, now)
            .map_err(internal)?;
        let matched = open.iter().find_map(|record| {
            let challenge = OfflineChallenge::decode(&record.challenge).ok()?;
            (challenge.device_id == self.device_id && challenge.accepts(&key, code))
                .then_some((record, challenge))
        });
        let user = self.user_name(caller);
        let Some((record, challenge)) = matched else {
            lock(&self.offline_failures)
                .entry(caller)
                .or_default()
                .push_back(Instant::now());
            let mut event = AuditEvent::new("offline_code_refused");
            event.uid = Some(caller);
            event.user = Some(user);
            event.reason = Some("the code answers none of the user's open challenges".into());
            self.audit.send(event);
            return Err(GrantError::Forbidden(
                "this code does not answer any of your open challenges: it may be mistyped, \
                 used already, expired, or made for another user or device"
                    .into(),
            ));
        };
        // The challenge is this device's own (the code is its MAC): its
        // identity was made from a Subject, so this only fails on a bug.
        let identity = SubjectIdentity::try_from(&challenge.identity)
            .map_err(|e| GrantError::Internal(format!("the challenge names no binary: {e}")))?;
        if !self
            .lock_store()?
            .use_offline_challenge(&record.nonce, now)
            .map_err(internal)?
        {
            return Err(GrantError::Forbidden("this code was used already".into()));
        }
        let uses = self
            .decider
            .upgrade()
            .and_then(|d| {
                d.policy()
                    .engine
                    .rule(&challenge.rule_id)
                    .map(|r| r.approval.map_or(1, |a| a.uses))
            })
            .unwrap_or(1);
        let grant = NewGrant {
            uid: caller,
            user: user.clone(),
            identity,
            rule_id: challenge.rule_id.clone(),
            not_before: challenge.not_before,
            not_after: challenge.not_after,
            uses: uses.max(1),
            source: GrantSource::OfflineCode,
            request_id: None,
            justification: None,
            path: None,
        };
        let id = self.insert_grant(&grant)?;
        let mut event = AuditEvent::new("offline_code_accepted")
            .with_detail("grant_id", id)
            .with_detail("nonce", record.nonce.as_str());
        event.uid = Some(caller);
        event.user = Some(user);
        event.rule_id = Some(challenge.rule_id.clone());
        event.sha256 = (grant.identity.kind == epm_store::IdentityKind::Sha256)
            .then(|| grant.identity.value.clone());
        self.audit.send(event);
        Ok(grant_info(id, &grant))
    }

    pub(super) fn offline_key(&self) -> Result<Vec<u8>, Refused> {
        let not_enrolled = || {
            GrantError::BadRequest("offline codes need this device to be enrolled with a platform (the key is made at enrollment)"
                    .to_owned(),
            )
        };
        let credentials = self
            .credentials
            .as_ref()
            .ok_or_else(not_enrolled)?
            .load()
            .map_err(|e| GrantError::Internal(format!("cannot read the enrollment: {e}")))?
            .ok_or_else(not_enrolled)?;
        base64::engine::general_purpose::STANDARD
            .decode(credentials.offline_key.as_bytes())
            .map_err(|_| GrantError::Internal("the stored offline key is corrupt".into()))
    }
}
