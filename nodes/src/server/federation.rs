//! The calls between clusters, [`AgentServer`]'s side: `locate`,
//! `adoptLocator`, `invite` and `accept` (the `Agent` methods in `adapter`
//! call these).

use capnp::Error as CapError;
use capstan_proto::RequestId;
use capstan_proto::api_capnp::agent;

use super::{AgentServer, actor_error, failed, request_id, text};

impl AgentServer {
    pub(super) async fn serve_locate(
        &self,
        params: agent::LocateParams,
        mut results: agent::LocateResults,
    ) -> Result<(), CapError> {
        let path = text(params.get()?.get_path(), "path")?;
        // Check first, so that a node that cannot be reached issues nothing.
        self.net.locator([0; 32]).map_err(failed)?;
        let (_, swiss) = self.handle.locate(&path).await.map_err(actor_error)?;
        let locator = self.net.fresh_locator(swiss).await.map_err(failed)?;
        results.get().set_locator(locator.to_string().as_str());
        Ok(())
    }

    pub(super) async fn serve_adopt_locator(
        &self,
        params: agent::AdoptLocatorParams,
        mut results: agent::AdoptLocatorResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let path = text(p.get_path(), "path")?;
        let locator: capstan_proto::Locator = text(p.get_locator(), "locator")?
            .parse()
            .map_err(|e: capstan_proto::LocatorError| failed(e.to_string()))?;
        if locator.cluster == self.net.cluster_id() {
            return Err(failed(
                "this locator is of this node's own cluster; use the name it was located from",
            ));
        }
        let remote = capstan_actors::RemoteRec {
            cluster: locator.cluster,
            swiss: locator.swiss,
            addrs: locator.addrs,
        };
        // Checked with its cluster before it is named: a forged or revoked
        // locator (or one whose address is another cluster's) is refused
        // now, not at its first use; an unreachable cluster names nothing.
        match self.net.check(&remote).await {
            Ok(_) => {}
            Err(crate::net::NetError::Refused(why)) => {
                return Err(failed(format!("{why}; nothing was named")));
            }
            Err(crate::net::NetError::Transient(why)) => {
                return Err(failed(format!(
                    "{why}; nothing was named (a locator is checked with its cluster before it is named: try again once that node answers)"
                )));
            }
        }
        let id = self
            .handle
            .adopt_locator(req, &path, remote)
            .await
            .map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }

    pub(super) async fn serve_invite(
        &self,
        params: agent::InviteParams,
        mut results: agent::InviteResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let name = text(p.get_name(), "name")?;
        // (An older client sends no request id: then a retry is not recognised.)
        let req = if p.get_req_id()?.is_empty() {
            RequestId::random()
        } else {
            request_id(p.get_req_id())?
        };
        // Check first, so that a node that cannot be reached invites no one.
        self.net.locator([0; 32]).map_err(failed)?;
        let swiss = self.handle.invite(req, &name).await.map_err(actor_error)?;
        let locator = self.net.fresh_locator(swiss).await.map_err(failed)?;
        results.get().set_invitation(locator.to_string().as_str());
        Ok(())
    }

    pub(super) async fn serve_accept(
        &self,
        params: agent::AcceptParams,
        mut results: agent::AcceptResults,
    ) -> Result<(), CapError> {
        let p = params.get()?;
        let req = request_id(p.get_req_id())?;
        let name = text(p.get_name(), "name")?;
        let invitation: capstan_proto::Locator = text(p.get_invitation(), "invitation")?
            .parse()
            .map_err(|e: capstan_proto::LocatorError| failed(e.to_string()))?;
        if invitation.cluster == self.net.cluster_id() {
            return Err(failed(
                "this invitation is from this node's own cluster; invitations connect different nodes",
            ));
        }
        self.net.locator([0; 32]).map_err(|_| {
            failed("accepting an invitation needs a listening node, so that the inviter can reach it: restart it with `capstan start --listen HOST:PORT`")
        })?;
        // Hold the name (and record the handle we offer) before asking the
        // inviter: a crash or a failure from here on is taken up again by
        // the same `accept`.
        let step = self
            .handle
            .begin_accept(req, &name, invitation.cluster, invitation.swiss)
            .await
            .map_err(actor_error)?;
        let (placeholder, redeem_req, handle) = match step {
            capstan_actors::AcceptStep::Done(id) => {
                results.get().set_id(id.as_bytes());
                return Ok(());
            }
            capstan_actors::AcceptStep::Redeem {
                placeholder,
                req,
                handle,
            } => (placeholder, req, handle),
        };
        let inviter = match self.net.accept(&invitation, handle, redeem_req).await {
            Ok(i) => i,
            Err(crate::net::NetError::Refused(why)) => {
                if let Err(e) = self.handle.abort_accept(&name, placeholder).await {
                    tracing::warn!("cannot free the name held for a refused invitation: {e}");
                }
                return Err(failed(why));
            }
            Err(crate::net::NetError::Transient(why)) => {
                return Err(failed(format!(
                    "{why}; {name} is held for this invitation (type `accepting`): run the same `capstan accept` again to finish, or `capstan remove {name}` to give up"
                )));
            }
        };
        let id = self
            .handle
            .finish_accept(req, placeholder, inviter)
            .await
            .map_err(actor_error)?;
        results.get().set_id(id.as_bytes());
        Ok(())
    }
}
