//! What a node serves to other clusters: the gateway on every incoming
//! connection and the objects restored through it.

use super::*;

/// The bootstrap object of an incoming connection.
pub(super) struct GatewayServer {
    pub(super) rt: Runtime,
    pub(super) conn: quinn::Connection,
    pub(super) failures: Cell<u32>,
    pub(super) caller: Caller,
    /// The node's known clusters: a caller that restores a locator joins.
    pub(super) known: Rc<Known>,
}

impl gateway::Server for GatewayServer {
    async fn applied(
        self: Rc<Self>,
        params: gateway::AppliedParams,
        mut results: gateway::AppliedResults,
    ) -> Result<(), CapError> {
        let list = params.get()?.get_items()?;
        let mut ids = Vec::with_capacity(list.len() as usize);
        for d in list.iter() {
            ids.push(item_id(d?)?);
        }
        let applied = self.rt.applied_items(&ids).await.map_err(wire_error)?;
        let mut l = results.get().init_applied(applied.len() as u32);
        for (i, a) in applied.into_iter().enumerate() {
            l.set(i as u32, a);
        }
        Ok(())
    }

    async fn restore(
        self: Rc<Self>,
        params: gateway::RestoreParams,
        mut results: gateway::RestoreResults,
    ) -> Result<(), CapError> {
        let swiss = params.get()?.get_swiss()?;
        let swiss: [u8; 32] = swiss
            .try_into()
            .map_err(|_| failed("a swiss number is 32 bytes"))?;
        let hash = capstan_actors::remote::swiss_hash(&swiss);
        match self.rt.locator_record(hash).await {
            Ok(Some(rec)) => {
                if self.caller.cluster != self.caller.own {
                    mark_known(&self.known, self.caller.cluster);
                }
                results
                    .get()
                    .set_object(capnp_rpc::new_client(ObjectServer {
                        rt: self.rt.clone(),
                        hash,
                        target: rec.target,
                        peer: rec.peer,
                        caller: self.caller,
                    }));
                Ok(())
            }
            Ok(None) => {
                let n = self.failures.get() + 1;
                self.failures.set(n);
                tracing::info!(remote = %self.conn.remote_address(), failures = n, "restore of an unknown or revoked locator");
                tokio::time::sleep(RESTORE_FAILURE_DELAY).await;
                if n >= MAX_RESTORE_FAILURES {
                    self.conn.close(1u32.into(), b"too many failed restores");
                }
                Err(failed(
                    "unknown or revoked locator: it was cancelled, or never issued by this cluster",
                ))
            }
            Err(e) => Err(wire_error(e)),
        }
    }

    async fn ping(
        self: Rc<Self>,
        params: gateway::PingParams,
        mut results: gateway::PingResults,
    ) -> Result<(), CapError> {
        let p = params.get()?.get_payload()?;
        if p.len() > MAX_PING {
            return Err(failed(format!("ping payload over {MAX_PING} bytes")));
        }
        results.get().set_payload(p);
        Ok(())
    }

    async fn member(
        self: Rc<Self>,
        _: gateway::MemberParams,
        mut results: gateway::MemberResults,
    ) -> Result<(), CapError> {
        // Only a node presenting this cluster's key is a member; another
        // cluster's node (or a lone node) gets nothing.
        if self.caller.cluster != self.caller.own || self.rt.membership().is_none() {
            return Err(failed(
                "the member interface is only for nodes of this cluster",
            ));
        }
        results
            .get()
            .set_member(capnp_rpc::new_client(members::MemberServer {
                rt: self.rt.clone(),
            }));
        Ok(())
    }
}

/// A capability restored from a locator; every call re-checks the locator.
pub(super) struct ObjectServer {
    pub(super) rt: Runtime,
    pub(super) hash: [u8; 32],
    pub(super) target: capstan_proto::FormulaId,
    /// Who this handle was given to (invite/accept), if anyone.
    pub(super) peer: Option<capstan_proto::FormulaId>,
    pub(super) caller: Caller,
}

impl ObjectServer {
    pub(super) async fn check(&self) -> Result<(), CapError> {
        match self.rt.locator_record(self.hash).await {
            Ok(Some(r)) if r.target == self.target && r.accepted.is_none() => Ok(()),
            Ok(Some(r)) if r.accepted.is_some() => Err(failed(
                "revoked: this invitation was accepted already (it works once)",
            )),
            Ok(_) => Err(failed(
                "revoked: the locator of this capability was cancelled",
            )),
            Err(e) => Err(wire_error(e)),
        }
    }
}

impl object::Server for ObjectServer {
    async fn show(
        self: Rc<Self>,
        _: object::ShowParams,
        mut results: object::ShowResults,
    ) -> Result<(), CapError> {
        self.check().await?;
        let s = self
            .rt
            .show_formula(self.target)
            .await
            .map_err(wire_error)?;
        let mut r = results.get();
        r.set_type(s.kind.as_str());
        r.set_detail(s.detail.as_str());
        Ok(())
    }

    async fn cat(
        self: Rc<Self>,
        _: object::CatParams,
        mut results: object::CatResults,
    ) -> Result<(), CapError> {
        self.check().await?;
        let (kind, data) = self.rt.cat_formula(self.target).await.map_err(wire_error)?;
        let mut r = results.get();
        r.set_kind(match kind {
            ValueKind::Text => capstan_proto::net_capnp::ValueKind::Text,
            ValueKind::Json => capstan_proto::net_capnp::ValueKind::Json,
            ValueKind::Bytes => capstan_proto::net_capnp::ValueKind::Bytes,
        });
        r.set_data(&data);
        Ok(())
    }

    async fn deliver(
        self: Rc<Self>,
        params: object::DeliverParams,
        _: object::DeliverResults,
    ) -> Result<(), CapError> {
        self.check().await?;
        let p = params.get()?;
        let item = item_id(p.get_id()?)?;
        let env = capstan_actors::Envelope::read(p.get_envelope()?, false)
            .map_err(|e| failed(format!("bad envelope: {e}")))?;
        let Some(peer) = self.peer else {
            return Err(failed(
                "this capability takes no mail: only handles made by `capstan invite`/`accept` do",
            ));
        };
        self.rt
            .receive_deliver(self.target, peer, item, env, self.caller)
            .await
            .map_err(wire_error)
    }

    async fn settle(
        self: Rc<Self>,
        params: object::SettleParams,
        _: object::SettleResults,
    ) -> Result<(), CapError> {
        self.check().await?;
        let p = params.get()?;
        let item = item_id(p.get_id()?)?;
        let s = capstan_actors::Settlement::read(p.get_settlement()?, false)
            .map_err(|e| failed(format!("bad settlement: {e}")))?;
        // Authority is checked there: only the locator given to the
        // request's recipient settles (not any locator of the promise).
        self.rt
            .receive_settle(self.hash, item, s, self.caller)
            .await
            .map(drop)
            .map_err(wire_error)
    }

    async fn accept(
        self: Rc<Self>,
        params: object::AcceptParams,
        mut results: object::AcceptResults,
    ) -> Result<(), CapError> {
        // (The locator is checked there: an accepted invitation still
        // answers its redeemer's retry.)
        let p = params.get()?;
        let handle = capstan_actors::RemoteRec::read_wire(p.get_handle()?)
            .map_err(|e| failed(format!("bad handle: {e}")))?;
        // A caller without a request id cannot retry (an older node).
        let req = match p.get_req_id()? {
            [] => capstan_proto::RequestId::random(),
            r => item_id(r)?,
        };
        let swiss = self
            .rt
            .accept_invitation(self.target, self.hash, self.caller, req, handle)
            .await
            .map_err(wire_error)?;
        results.get().set_swiss(&swiss);
        Ok(())
    }
}

pub(super) fn item_id(d: &[u8]) -> Result<capstan_proto::RequestId, CapError> {
    capstan_proto::RequestId::from_slice(d).map_err(|_| failed("an item id is 16 bytes"))
}
