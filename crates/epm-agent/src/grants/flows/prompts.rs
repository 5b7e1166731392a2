//! Prompts: the helpers that subscribe for their user, and what a refused
//! `justify`/`approve` exec becomes on the flows thread (a prompt, the
//! state of the user's request, or its reason).

use super::*;

impl Flows {
    // ---- helpers' subscriptions -------------------------------------------------

    /// Registers a helper for `uid`; events arrive on the receiver until
    /// [`Flows::unsubscribe`].
    pub(crate) fn subscribe(&self, uid: u32) -> (u64, Receiver<UserEvent>) {
        let (tx, rx) = bounded(SUBSCRIBER_QUEUE);
        let id = self.fresh_id();
        lock(&self.subscribers)
            .entry(uid)
            .or_default()
            .push((id, tx));
        (id, rx)
    }

    /// Removes a helper's registration.
    pub(crate) fn unsubscribe(&self, uid: u32, id: u64) {
        let mut subscribers = lock(&self.subscribers);
        if let Some(list) = subscribers.get_mut(&uid) {
            list.retain(|(sub, _)| *sub != id);
            if list.is_empty() {
                subscribers.remove(&uid);
            }
        }
    }

    pub(super) fn has_subscriber(&self, uid: u32) -> bool {
        lock(&self.subscribers).contains_key(&uid)
    }

    /// Sends an event to every helper of `uid`; a helper whose queue is
    /// full or gone is dropped (it reconnects).
    pub(crate) fn notify(&self, uid: u32, event: &UserEvent) {
        let mut subscribers = lock(&self.subscribers);
        if let Some(list) = subscribers.get_mut(&uid) {
            list.retain(|(_, tx)| match tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(uid, "a helper does not read its events; dropping it");
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
            if list.is_empty() {
                subscribers.remove(&uid);
            }
        }
    }

    /// One of a user's requests changed (the sync thread, the sweep).
    pub(crate) fn request_changed(&self, request: &Request) {
        let mut event = AuditEvent::new("request_changed")
            .with_detail("request_id", request.id.as_str())
            .with_detail("state", request.state.as_str());
        event.uid = Some(request.uid);
        event.user = Some(request.user.clone());
        event.path = Some(request.path.clone());
        event.rule_id = Some(request.rule_id.clone());
        event.reason = request.state_reason.clone();
        self.audit.send(event);
        self.notify(
            request.uid,
            &UserEvent::RequestChanged(request_info(request)),
        );
    }

    /// Audits an event of the flows' neighbours (elevated runs).
    pub(crate) fn audit_event(&self, event: AuditEvent) {
        self.audit.send(event);
    }

    /// Audits a refused request of a user (`kind`: what was refused), so
    /// attempts leave a trace even when nothing was decided.
    pub(crate) fn audit_refusal(
        &self,
        kind: &str,
        uid: u32,
        user: &str,
        path: &str,
        rule_id: Option<&str>,
        why: &str,
    ) {
        let mut event = AuditEvent::new(kind);
        event.uid = Some(uid);
        event.user = Some(user.to_owned());
        event.path = Some(path.to_owned());
        event.rule_id = rule_id.map(str::to_owned);
        event.decision = Some("deny".into());
        event.reason = Some(why.to_owned());
        event.device_id = Some(self.device_id.clone());
        self.audit.send(event);
    }

    /// The platform's time at check-in: the clock never reads earlier.
    pub(crate) fn observe_platform_time(&self, time: Timestamp) {
        self.clock.observe(time);
    }

    pub(super) fn fresh_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    // ---- refusals (flows thread) ------------------------------------------------

    pub(super) fn handle_refusal(&self, refusal: Refusal) {
        if !self.has_subscriber(refusal.uid) {
            // Nobody to tell (ssh, a service account): the audit has it,
            // and `epmctl` offers the same flows.
            return;
        }
        let blocked = |because: BlockReason| {
            UserEvent::Blocked(Blocked {
                program: program_name(&refusal.path),
                path: refusal.path.clone(),
                rule_id: refusal.rule_id.clone(),
                message: refusal.message.clone(),
                because,
            })
        };
        let (Some(identity), Some(rule_id), Action::Justify | Action::Approve) =
            (&refusal.identity, &refusal.rule_id, refusal.action)
        else {
            if self.first_in_a_while(&refusal, "denied") {
                self.notify(refusal.uid, &blocked(BlockReason::Denied));
            }
            return;
        };
        let kind = match refusal.action {
            Action::Approve => PromptKind::Approve,
            _ => PromptKind::Justify,
        };
        if kind == PromptKind::Approve {
            match self.approval_situation(refusal.uid, identity) {
                Situation::Blocked(because) => {
                    if self.first_in_a_while(&refusal, situation_name(&because)) {
                        self.notify(refusal.uid, &blocked(because));
                    }
                    return;
                }
                Situation::AskAgainAfter(because) => {
                    if self.first_in_a_while(&refusal, situation_name(&because)) {
                        self.notify(refusal.uid, &blocked(because));
                    }
                }
                Situation::Ask => {}
            }
        }
        if !self.first_in_a_while(&refusal, "prompt") {
            return;
        }
        let Some(decider) = self.decider.upgrade() else {
            return;
        };
        let policy = decider.policy();
        let Some(rule) = policy.engine.rule(rule_id) else {
            return;
        };
        let id = self.fresh_id();
        let record = PromptRecord {
            uid: refusal.uid,
            user: refusal.user.clone(),
            kind,
            identity: identity.clone(),
            path: refusal.path.clone(),
            argv: refusal.argv.clone(),
            rule_id: rule_id.clone(),
            sent: Instant::now(),
        };
        self.remember_prompt(id, record);
        let prompt = Prompt {
            id,
            kind,
            program: program_name(&refusal.path),
            path: refusal.path.clone(),
            argv: refusal.argv.clone(),
            rule_id: rule_id.clone(),
            message: refusal.message.clone(),
            justification: rule.justification.cloned().unwrap_or_default(),
            approval: (kind == PromptKind::Approve)
                .then(|| rule.approval.cloned().unwrap_or_default()),
        };
        self.notify(refusal.uid, &UserEvent::Prompt(prompt));
    }

    /// Whether this user was not told the same thing about the same
    /// program within [`REPEAT_QUIET`]: a script that loops on a refused
    /// program must not flood them, but news (approved, rejected) always
    /// gets through.
    pub(super) fn first_in_a_while(&self, refusal: &Refusal, what: &str) -> bool {
        let program = refusal
            .identity
            .as_ref()
            .map_or_else(|| refusal.path.clone(), |i| i.value.clone());
        let key = (refusal.uid, format!("{what}:{program}"));
        let mut shown = lock(&self.recently_shown);
        if shown
            .get(&key)
            .is_some_and(|at| at.elapsed() < REPEAT_QUIET)
        {
            return false;
        }
        shown.insert(key, Instant::now());
        true
    }

    pub(super) fn remember_prompt(&self, id: u64, record: PromptRecord) {
        let mut prompts = lock(&self.prompts);
        prompts.retain(|_, p| p.sent.elapsed() < PROMPT_TTL);
        let mine: Vec<(u64, Instant)> = prompts
            .iter()
            .filter(|(_, p)| p.uid == record.uid)
            .map(|(id, p)| (*id, p.sent))
            .collect();
        if mine.len() >= MAX_PROMPTS_PER_USER
            && let Some((oldest, _)) = mine.iter().min_by_key(|(_, sent)| *sent)
        {
            prompts.remove(oldest);
        }
        prompts.insert(id, record);
    }

    /// Where a user's approval for a binary stands.
    pub(super) fn approval_situation(&self, uid: u32, identity: &SubjectIdentity) -> Situation {
        let now = self.clock.now();
        let Ok(store) = self.store.lock() else {
            return Situation::Ask;
        };
        let requests: Vec<Request> = store
            .requests(Some(uid), None)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| same_identity(&r.identity, identity))
            .collect();
        let grants = store
            .grants_for_identity(uid, identity, 32)
            .unwrap_or_default();
        drop(store);
        situation(&requests, &grants, now)
    }

    /// Expires requests whose window ended and keeps the clock's floor.
    pub(super) fn sweep(&self) {
        let now = self.clock.now();
        let expired = {
            let Ok(mut store) = self.store.lock() else {
                return;
            };
            if let Err(error) = store.set_meta(FLOOR_META_KEY, &now.to_string()) {
                tracing::debug!(%error, "cannot keep the clock floor");
            }
            let ids = store.expire_requests(now).unwrap_or_default();
            ids.iter()
                .filter_map(|id| store.request(id).ok().flatten())
                .collect::<Vec<_>>()
        };
        for request in &expired {
            self.request_changed(request);
        }
        lock(&self.recently_shown).retain(|_, at| at.elapsed() < REPEAT_QUIET);
        lock(&self.prompts).retain(|_, p| p.sent.elapsed() < PROMPT_TTL);
    }
}
