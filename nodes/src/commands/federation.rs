//! The commands between clusters: `locate`, `adopt-locator`, `invite` and
//! `accept`.

use anyhow::{anyhow, bail};
use capstan_proto::RequestId;
use serde_json::json;

use super::print_made;
use crate::cli::Command;
use crate::client::Client;
use crate::output::print_json;

/// Runs a command between clusters.
pub(super) async fn run(client: &Client, command: Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::Locate { path, .. } => {
            let locator = client
                .call(|a| {
                    let path = &path;
                    async move {
                        let mut r = a.locate_request();
                        r.get().set_path(path.as_str());
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_locator()?.to_string()?)
                    }
                })
                .await?;
            if json {
                print_json(&json!({"locator": locator}));
            } else {
                println!("{locator}");
            }
        }
        Command::AdoptLocator { locator, name, .. } => {
            let parsed = locator
                .trim()
                .parse::<capstan_proto::Locator>()
                .map_err(|e| {
                    anyhow!(
                        "{e}; a locator looks like capstan://<cluster-id>/<swiss>?at=<host:port>"
                    )
                })?;
            let req = RequestId::random();
            let id = client
                .call(|a| {
                    let (locator, name) = (&locator, &name);
                    async move {
                        let mut r = a.adopt_locator_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_path(name.as_str());
                        r.get().set_locator(locator.trim());
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_id()?.to_vec())
                    }
                })
                .await?;
            print_made(
                json,
                &format!(
                    "named {name}: a capability of cluster {}…, checked with that cluster",
                    &capstan_proto::locator::encode32(&parsed.cluster)[..12]
                ),
                &id,
            );
        }
        Command::Invite { name, .. } => {
            let req = RequestId::random();
            let invitation = client
                .call(|a| {
                    let name = &name;
                    async move {
                        let mut r = a.invite_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_name(name.as_str());
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_invitation()?.to_string()?)
                    }
                })
                .await?;
            if json {
                print_json(&json!({"invitation": invitation, "name": name}));
            } else {
                println!("{invitation}");
                eprintln!(
                    "(give this to the invited node's operator: `capstan accept '<invitation>' <their name for you>`; it works once)"
                );
            }
        }
        Command::Accept {
            invitation, name, ..
        } => {
            let parsed = invitation.trim().parse::<capstan_proto::Locator>().map_err(|e| {
                anyhow!("{e}; an invitation looks like capstan://<cluster-id>/<swiss>?at=<host:port>")
            })?;
            let req = RequestId::random();
            let id = client
                .call(|a| {
                    let (invitation, name) = (&invitation, &name);
                    async move {
                        let mut r = a.accept_request();
                        r.get().set_req_id(&req.0);
                        r.get().set_invitation(invitation.trim());
                        r.get().set_name(name.as_str());
                        let answer = r.send().promise.await?;
                        Ok(answer.get()?.get_id()?.to_vec())
                    }
                })
                .await?;
            print_made(
                json,
                &format!(
                    "accepted the invitation: {name} names the inviting agent of cluster {}…",
                    &capstan_proto::locator::encode32(&parsed.cluster)[..12]
                ),
                &id,
            );
        }
        other => bail!("internal error: {other:?} is not a command between clusters"),
    }
    Ok(())
}
