//! Delivering the outbox: the shell around `capstan_actors::rules::outbox`
//! (which queue gets a courier when) that lists the queues, runs the
//! couriers and sends their items.

use super::*;

impl Net {
    /// Delivers one outbox item.
    pub async fn send_item(self: &Rc<Self>, item: &OutboxItem) -> Result<(), NetError> {
        let fill = |r: &RemoteRec| self.fill(r);
        let has_own = match &item.op {
            OutOp::Deliver(e) => match &e.body {
                capstan_actors::EnvelopeBody::Package { refs, .. } => {
                    refs.iter().any(RemoteRec::is_own)
                }
                capstan_actors::EnvelopeBody::Request { .. } => true,
            },
            OutOp::Settle(capstan_actors::Settlement::Resolved(r)) => r.is_own(),
            OutOp::Settle(_) => false,
        };
        if has_own && self.advertised.is_empty() {
            return Err(NetError::Refused("it carries references to this node, which does not listen for other nodes; restart it with `capstan start --listen HOST:PORT`".into()));
        }
        let fill = &fill;
        match &item.op {
            OutOp::Deliver(env) => {
                self.with_object(&item.to, |o| async move {
                    let mut r = o.deliver_request();
                    r.get().set_id(&item.id.0);
                    env.write(r.get().init_envelope(), fill);
                    r.send().promise.await.map(drop)
                })
                .await
            }
            OutOp::Settle(st) => {
                self.with_object(&item.to, |o| async move {
                    let mut r = o.settle_request();
                    r.get().set_id(&item.id.0);
                    st.write(r.get().init_settlement(), fill);
                    r.send().promise.await.map(drop)
                })
                .await
            }
        }
    }

    /// Delivers the outbox for as long as the node runs. The outbox is a
    /// queue per peer cluster, and each queue with mail gets a courier of
    /// its own (at most [`capstan_actors::rules::outbox::COURIERS`] at a time, taken in turn): it
    /// delivers up to a batch in order, removing each item once the far
    /// side acknowledged it and bouncing to its sender an item the far side
    /// refused; a cluster that cannot be reached is retried with
    /// exponential backoff (capped at [`capstan_actors::rules::outbox::MAX_BACKOFF`]). So a dead or
    /// slow peer delays only its own mail.
    ///
    /// Only a refusal for good bounces at once ([`NetError::Refused`]);
    /// an item that keeps failing otherwise ([`NetError::Transient`]) is
    /// retried until it is `expiry` old ([`OUTBOX_EXPIRY`] unless set
    /// otherwise), then bounced once with the last error.
    pub async fn run_outbox(self: Rc<Self>, expiry: Duration) {
        match self.rt.migrate_outbox().await {
            Ok(0) => {}
            Ok(n) => tracing::info!("moved {n} outbox items into queues per peer cluster"),
            Err(e) => tracing::warn!("cannot move the outbox of an earlier version: {e}"),
        }
        // Which queues get a courier when (see capstan_actors::rules::outbox);
        // this loop only lists the queues, runs the couriers and sleeps.
        let schedule = Rc::new(RefCell::new(Schedule::default()));
        let done = Rc::new(tokio::sync::Notify::new());
        // Where the next listing of queues starts (when one listing cannot
        // hold them all).
        let mut after: Option<[u8; 32]> = None;
        loop {
            let peers = match self
                .rt
                .outbox_peers(after, capstan_actors::federation::OUTBOX_PEERS)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("cannot read the outbox: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let complete = peers.len() < capstan_actors::federation::OUTBOX_PEERS;
            after = if complete {
                None
            } else {
                peers.last().copied()
            };
            let plan = schedule
                .borrow_mut()
                .plan(&peers, complete, std::time::Instant::now());
            for c in plan.start {
                tokio::task::spawn_local(self.clone().courier(
                    c,
                    expiry,
                    schedule.clone(),
                    done.clone(),
                ));
            }
            let wake = tokio::time::Instant::from_std(plan.wake);
            tokio::select! {
                _ = self.rt.outbox_changed() => {}
                _ = done.notified() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// One turn of the courier of peer cluster `cluster`: delivers up to a
    /// batch of its queue, then records how it went and wakes the outbox loop.
    pub(super) async fn courier(
        self: Rc<Self>,
        cluster: [u8; 32],
        expiry: Duration,
        schedule: Rc<RefCell<Schedule>>,
        done: Rc<tokio::sync::Notify>,
    ) {
        let last_error = schedule.borrow().last_error(&cluster).map(str::to_string);
        let mut settled = 0;
        let r = self
            .deliver_batch(cluster, expiry, last_error.as_deref(), &mut settled)
            .await;
        schedule
            .borrow_mut()
            .finished(cluster, r, settled, std::time::Instant::now());
        done.notify_one();
    }

    /// Delivers up to a batch of the queue of `cluster`, in order; stops
    /// at an item to retry later, with why. An item older than `expiry`
    /// is bounced instead (with `last_error`, the queue's last failure).
    /// `settled` counts the items delivered or bounced (what the schedule
    /// needs to know of a turn that stopped: it moved, or not).
    pub(super) async fn deliver_batch(
        self: &Rc<Self>,
        cluster: [u8; 32],
        expiry: Duration,
        last_error: Option<&str>,
        settled: &mut usize,
    ) -> Result<(), String> {
        let items = self
            .rt
            .outbox_for(cluster, capstan_actors::federation::OUTBOX_BATCH)
            .await
            .map_err(|e| {
                tracing::warn!("cannot read the outbox: {e}");
                format!("cannot read the outbox: {e}")
            })?;
        for item in items {
            let age = Duration::from_micros(
                capstan_actors::federation::now_us().saturating_sub(item.created_us),
            );
            let outcome = match capstan_actors::rules::outbox::verdict(age, expiry, last_error) {
                Verdict::Deliver => self.send_item(&item).await,
                Verdict::Expired(why) => Err(NetError::Refused(why)),
            };
            // Before a bounce: an earlier try may have been applied with its
            // answer lost, and the far side refuse the retry since (its
            // recipient cancelled): then it was delivered, not bounced. If
            // the far side cannot say now, the item waits for the next try
            // (a version without the call answers "not applied").
            let outcome = match outcome {
                Err(NetError::Refused(why)) => match self.applied(&item.to, item.id).await {
                    Some(true) => Ok(()),
                    Some(false) => Err(NetError::Refused(why)),
                    None => Err(NetError::Transient(format!(
                        "{why} (the far side could not say whether an earlier try was applied)"
                    ))),
                },
                other => other,
            };
            match outcome {
                Ok(()) => {
                    if let Err(e) = self.rt.outbox_done(&item).await {
                        tracing::warn!("cannot remove a delivered outbox item: {e}");
                        return Err(format!("cannot remove a delivered outbox item: {e}"));
                    }
                    *settled += 1;
                }
                Err(NetError::Refused(why)) => {
                    tracing::info!(item = %item.id, "outbox item bounced: {why}");
                    match self.rt.outbox_bounce(&item, &why).await {
                        Ok(()) => *settled += 1,
                        // The store failed: try again later.
                        Err(
                            e @ (capstan_actors::Error::Store(_)
                            | capstan_actors::Error::Unavailable(_)
                            | capstan_actors::Error::Fenced(_)
                            | capstan_actors::Error::Unreachable(_)
                            | capstan_actors::Error::InboxSlotTaken { .. }),
                        ) => {
                            tracing::warn!("cannot bounce an outbox item: {e}");
                            return Err(format!("cannot bounce an outbox item: {e}"));
                        }
                        // Its sender cannot be told (its record is gone or
                        // damaged): drop it rather than block the queue.
                        Err(e) => {
                            tracing::error!(item = %item.id, "dropping an outbox item whose sender cannot be told it was refused ({why}): {e}");
                            if let Err(e) = self.rt.outbox_done(&item).await {
                                return Err(format!("cannot remove an outbox item: {e}"));
                            }
                            *settled += 1;
                        }
                    }
                }
                Err(NetError::Transient(why)) => {
                    tracing::debug!(item = %item.id, "outbox delivery postponed: {why}");
                    return Err(why);
                }
            }
        }
        Ok(())
    }
}
