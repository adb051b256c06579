//! The gRPC services: translate requests to broker operations and errors to
//! `tonic::Status` (the one place that happens is `Error`'s `From` impl).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::audit::ACTOR_ADMIN;
use crate::broker::Broker;
use crate::error::Error;
use crate::gate::Gate;
use crate::lease::Selector;
use crate::proto::{
    self, admin_server, broker_server, envelope_server, holders_server, retention_server,
    revoke_leases_request,
};
use crate::retention::HolderCaller;

/// Every service over one shared broker (behind its gate).
#[derive(Clone)]
pub struct Services {
    gate: Arc<Gate>,
}

impl Services {
    /// Services over the broker behind `gate`.
    pub fn new(gate: Arc<Gate>) -> Self {
        Services { gate }
    }

    /// The broker, or FAILED_PRECONDITION "sealed".
    fn broker(&self) -> Result<&Arc<Broker>, Status> {
        self.gate
            .broker()
            .ok_or_else(|| Status::from(self.gate.sealed_error()))
    }
}

/// The bearer token in `authorization`, if any.
fn bearer<T>(req: &Request<T>) -> Option<String> {
    // Bytes past ASCII (a token mistyped with an accented letter) make a
    // token that is then unknown, not a missing one.
    let raw = req.metadata().get("authorization")?;
    let v = String::from_utf8_lossy(raw.as_encoded_bytes());
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    Some(t.trim().to_string())
}

/// The caller's `x-request-id` when it is sane, else a fresh one.
fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .map(String::from)
        .unwrap_or_else(crate::keys::request_id)
}

impl Services {
    async fn admin<T>(
        &self,
        req: &Request<T>,
        action: &str,
        target: &str,
    ) -> Result<String, Status> {
        let rid = request_id(req);
        self.one_credential(req, action, target, &rid).await?;
        let token = bearer(req);
        self.broker()?
            .authenticate_admin(token.as_deref(), action, target, &rid)
            .await?;
        Ok(rid)
    }

    /// Refuses (audited) a request with more than one `authorization`
    /// header: which one counts would depend on the hop that reads it.
    async fn one_credential<T>(
        &self,
        req: &Request<T>,
        action: &str,
        target: &str,
        rid: &str,
    ) -> Result<(), Status> {
        if req.metadata().get_all("authorization").iter().count() > 1 {
            let e = Error::Unauthenticated(
                "the request carries several authorization headers; send exactly one".into(),
            );
            return Err(self
                .broker()?
                .deny_unknown("anonymous".into(), action, target, rid, e)
                .await
                .into());
        }
        Ok(())
    }

    async fn agent<T>(
        &self,
        req: &Request<T>,
        action: &str,
        target: &str,
    ) -> Result<(String, Arc<crate::agent::Agent>), Status> {
        let rid = request_id(req);
        self.one_credential(req, action, target, &rid).await?;
        let token = bearer(req);
        let agent = self
            .broker()?
            .authenticate_agent(token.as_deref(), peer_uid(req), action, target, &rid)
            .await?;
        Ok((rid, agent))
    }
}

/// The Unix uid of the process that connected over the broker's Unix
/// socket, as the kernel reported it (`SO_PEERCRED`); `None` over TCP.
fn peer_uid<T>(req: &Request<T>) -> Option<u32> {
    req.extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
}

/// Response header of `Watch`: the event id the stream starts after.
pub const EVENT_CURSOR: &str = "tessera-event-cursor";

#[tonic::async_trait]
impl broker_server::Broker for Services {
    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (rid, agent) = self.agent(&req, "watch", "events").await?;
        let r = req.into_inner();
        let broker = self.broker()?;
        // An id this broker never gave (past its newest event: a client's
        // mistake, or a store put back from an older copy) would wait
        // silently for events that already happened.
        let last = broker.last_event_id()?;
        if r.after_event_id > last {
            let e = Error::invalid(
                "after_event_id",
                format!(
                    "{} is past the newest event ({last}); resume after the id of the last \
                     event received from this broker, or 0",
                    r.after_event_id
                ),
            );
            return Err(broker
                .deny(agent.actor(), "watch", "events", &rid, e)
                .await
                .into());
        }
        let (rx, cursor) = match broker.watch(&rid, Arc::clone(&agent), r.after_event_id, r.resume)
        {
            Ok(w) => w,
            Err(e) => {
                return Err(broker
                    .deny(agent.actor(), "watch", "events", &rid, e)
                    .await
                    .into());
            }
        };
        broker
            .audit(crate::lease::agent_entry(
                &agent,
                "watch",
                "events",
                true,
                format!("watching events after {cursor}"),
                &rid,
            ))
            .await?;
        let mut resp = Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Self::WatchStream
        );
        resp.metadata_mut()
            .insert(EVENT_CURSOR, tonic::metadata::MetadataValue::from(cursor));
        Ok(resp)
    }

    async fn issue(
        &self,
        req: Request<proto::IssueRequest>,
    ) -> Result<Response<proto::Lease>, Status> {
        let (rid, agent) = self
            .agent(&req, "lease.issue", &req.get_ref().secret)
            .await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.broker()?
                .issue(&rid, &agent, r.secret, r.ttl_seconds)
                .await?,
        ))
    }

    async fn renew(
        &self,
        req: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::Lease>, Status> {
        let (rid, agent) = self
            .agent(&req, "lease.renew", &req.get_ref().lease_id)
            .await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.broker()?
                .renew(&rid, &agent, r.lease_id, r.ttl_seconds)
                .await?,
        ))
    }

    async fn revoke(
        &self,
        req: Request<proto::RevokeRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        let (rid, agent) = self
            .agent(&req, "lease.revoke", &req.get_ref().lease_id)
            .await?;
        let r = req.into_inner();
        let revoked = self.broker()?.revoke_own(&rid, &agent, r.lease_id).await?;
        Ok(Response::new(proto::RevokeResponse { revoked }))
    }
}

type BackupStream = Pin<Box<dyn Stream<Item = Result<proto::BackupChunk, Status>> + Send>>;
/// Bytes per backup chunk: well inside gRPC's 4 MiB message limit.
const BACKUP_CHUNK: usize = 256 * 1024;
/// How long a backup waits for its client to take the next chunk.
const BACKUP_STALL: std::time::Duration = std::time::Duration::from_secs(60);
type AuditStream = Pin<Box<dyn Stream<Item = Result<proto::AuditRecord, Status>> + Send>>;
type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;

#[tonic::async_trait]
impl admin_server::Admin for Services {
    async fn put_secret(
        &self,
        req: Request<proto::PutSecretRequest>,
    ) -> Result<Response<proto::SecretInfo>, Status> {
        let rid = self.admin(&req, "secret.put", &req.get_ref().name).await?;
        let mut r = req.into_inner();
        let value = Zeroizing::new(std::mem::take(&mut r.value));
        Ok(Response::new(
            self.broker()?
                .put_secret(&rid, std::mem::take(&mut r.name), value)
                .await?,
        ))
    }

    async fn show_secret(
        &self,
        req: Request<proto::ShowSecretRequest>,
    ) -> Result<Response<proto::SecretDetail>, Status> {
        let rid = self.admin(&req, "secret.show", &req.get_ref().name).await?;
        Ok(Response::new(
            self.broker()?
                .show_secret(&rid, &req.into_inner().name)
                .await?,
        ))
    }

    async fn configure_secret(
        &self,
        req: Request<proto::ConfigureSecretRequest>,
    ) -> Result<Response<proto::SecretDetail>, Status> {
        let rid = self
            .admin(&req, "secret.config", &req.get_ref().name)
            .await?;
        Ok(Response::new(
            self.broker()?
                .configure_secret(&rid, req.into_inner())
                .await?,
        ))
    }

    async fn rotate_now(
        &self,
        req: Request<proto::RotateNowRequest>,
    ) -> Result<Response<proto::RotationResult>, Status> {
        let rid = self
            .admin(&req, "secret.rotate", &req.get_ref().name)
            .await?;
        let b = Arc::clone(self.broker()?);
        let req = req.into_inner();
        Ok(Response::new(
            detached(
                &Arc::clone(&b),
                async move { b.rotate_now(&rid, req).await },
            )
            .await?,
        ))
    }

    async fn schedule_rotation(
        &self,
        req: Request<proto::ScheduleRotationRequest>,
    ) -> Result<Response<proto::SecretDetail>, Status> {
        let rid = self
            .admin(&req, "rotate.schedule", &req.get_ref().name)
            .await?;
        Ok(Response::new(
            self.broker()?
                .schedule_rotation(&rid, req.into_inner())
                .await?,
        ))
    }

    async fn unschedule_rotation(
        &self,
        req: Request<proto::ShowSecretRequest>,
    ) -> Result<Response<proto::SecretDetail>, Status> {
        let rid = self
            .admin(&req, "rotate.unschedule", &req.get_ref().name)
            .await?;
        Ok(Response::new(
            self.broker()?
                .unschedule_rotation(&rid, req.into_inner().name)
                .await?,
        ))
    }

    async fn rotation_status(
        &self,
        req: Request<proto::RotationStatusRequest>,
    ) -> Result<Response<proto::RotationStatusResponse>, Status> {
        let rid = self.admin(&req, "rotate.status", "*").await?;
        let secrets = self.broker()?.rotation_status()?;
        self.read_done(
            ACTOR_ADMIN.into(),
            "rotate.status",
            "*",
            &rid,
            secrets.len(),
        )
        .await?;
        Ok(Response::new(proto::RotationStatusResponse { secrets }))
    }

    async fn rekey_root(
        &self,
        req: Request<proto::RekeyRootRequest>,
    ) -> Result<Response<proto::RekeyRootResponse>, Status> {
        let rid = self.admin(&req, "root.rekey", "root-key").await?;
        Ok(Response::new(
            self.broker()?.rekey_root(&rid, req.into_inner()).await?,
        ))
    }

    async fn rotate_due(
        &self,
        req: Request<proto::RotateDueRequest>,
    ) -> Result<Response<proto::RotateDueResponse>, Status> {
        let rid = self.admin(&req, "rotate.due", "*").await?;
        let b = Arc::clone(self.broker()?);
        Ok(Response::new(proto::RotateDueResponse {
            results: detached(&Arc::clone(&b), async move {
                b.rotate_due(&rid, ACTOR_ADMIN).await
            })
            .await?,
        }))
    }

    async fn list_secrets(
        &self,
        req: Request<proto::ListSecretsRequest>,
    ) -> Result<Response<proto::ListSecretsResponse>, Status> {
        let rid = self.admin(&req, "secret.list", "*").await?;
        let secrets = self.broker()?.list_secrets(&rid).await?;
        Ok(Response::new(proto::ListSecretsResponse { secrets }))
    }

    async fn delete_secret(
        &self,
        req: Request<proto::DeleteSecretRequest>,
    ) -> Result<Response<proto::DeleteSecretResponse>, Status> {
        let rid = self
            .admin(&req, "secret.delete", &req.get_ref().name)
            .await?;
        let d = self
            .broker()?
            .delete_secret(&rid, req.into_inner().name)
            .await?;
        Ok(Response::new(proto::DeleteSecretResponse {
            versions_deleted: d.versions,
            leases_revoked: d.leases,
            archived_kept: d.archived_kept,
        }))
    }

    async fn create_agent(
        &self,
        req: Request<proto::CreateAgentRequest>,
    ) -> Result<Response<proto::CreateAgentResponse>, Status> {
        let rid = self
            .admin(&req, "agent.create", &req.get_ref().name)
            .await?;
        let (agent, token) = self.broker()?.create_agent(&rid, req.into_inner()).await?;
        Ok(Response::new(proto::CreateAgentResponse {
            agent: Some(agent),
            token: token.reveal_once().to_string(),
        }))
    }

    async fn list_agents(
        &self,
        req: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        let rid = self.admin(&req, "agent.list", "*").await?;
        let agents = self.broker()?.list_agents(&rid).await?;
        Ok(Response::new(proto::ListAgentsResponse { agents }))
    }

    async fn revoke_agent(
        &self,
        req: Request<proto::RevokeAgentRequest>,
    ) -> Result<Response<proto::RevokeAgentResponse>, Status> {
        let rid = self
            .admin(&req, "agent.revoke", &req.get_ref().name)
            .await?;
        let leases_revoked = self
            .broker()?
            .revoke_agent(&rid, req.into_inner().name)
            .await?;
        Ok(Response::new(proto::RevokeAgentResponse { leases_revoked }))
    }

    async fn list_leases(
        &self,
        req: Request<proto::ListLeasesRequest>,
    ) -> Result<Response<proto::ListLeasesResponse>, Status> {
        let rid = self.admin(&req, "lease.list", "*").await?;
        let r = req.into_inner();
        let leases = self
            .broker()?
            .list_leases(&rid, &r.agent, &r.secret, r.all, r.limit, &r.after)
            .await?;
        Ok(Response::new(proto::ListLeasesResponse { leases }))
    }

    async fn revoke_leases(
        &self,
        req: Request<proto::RevokeLeasesRequest>,
    ) -> Result<Response<proto::RevokeLeasesResponse>, Status> {
        let rid = self.admin(&req, "lease.revoke", "*").await?;
        let sel = match req.into_inner().selector {
            Some(revoke_leases_request::Selector::LeaseId(id)) => Selector::Id(id),
            Some(revoke_leases_request::Selector::Agent(a)) => Selector::Agent(a),
            Some(revoke_leases_request::Selector::Secret(s)) => Selector::Secret(s),
            Some(revoke_leases_request::Selector::All(true)) => Selector::All,
            _ => {
                let e = Error::invalid(
                    "selector",
                    "say which leases to revoke: --lease ID, --agent NAME, --secret NAME or --all",
                );
                return Err(self
                    .broker()?
                    .deny(ACTOR_ADMIN.into(), "lease.revoke", "*", &rid, e)
                    .await
                    .into());
            }
        };
        let revoked = self.broker()?.revoke_leases(&rid, sel).await?;
        Ok(Response::new(proto::RevokeLeasesResponse { revoked }))
    }

    async fn verify_audit(
        &self,
        req: Request<proto::VerifyAuditRequest>,
    ) -> Result<Response<proto::VerifyAuditResponse>, Status> {
        let rid = self.admin(&req, "audit.verify", "audit").await?;
        let checkpoints = req.into_inner().checkpoints;
        Ok(Response::new(
            self.broker()?.verify_audit(&rid, &checkpoints).await?,
        ))
    }

    async fn checkpoint_audit(
        &self,
        req: Request<proto::CheckpointAuditRequest>,
    ) -> Result<Response<proto::AuditCheckpoint>, Status> {
        let rid = self.admin(&req, "audit.checkpoint", "audit").await?;
        Ok(Response::new(self.broker()?.checkpoint_audit(&rid).await?))
    }

    type ExportAuditStream = AuditStream;

    async fn export_audit(
        &self,
        req: Request<proto::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        let rid = self.admin(&req, "audit.export", "audit").await?;
        let r = req.into_inner();
        self.broker()?
            .audit(crate::agent::admin_entry(
                "audit.export",
                "audit",
                true,
                format!("from seq {} since {}", r.from_seq, r.since),
                &rid,
            ))
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let broker = Arc::clone(self.broker()?);
        tokio::spawn(async move {
            // Past any sequence number, a start finds nothing (not, cast to
            // a negative, everything).
            let mut from = r.from_seq.clamp(1, i64::MAX as u64);
            loop {
                match broker.audit_page(from, r.since, 1000) {
                    Ok(page) if page.is_empty() => break,
                    Ok(page) => {
                        from = page.last().map_or(from, |p| p.seq + 1);
                        for rec in page {
                            if tx.send(Ok(rec)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type BackupStream = BackupStream;

    async fn backup(
        &self,
        req: Request<proto::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let rid = self.admin(&req, "store.backup", "store").await?;
        let snap = self.broker()?.backup(&rid).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let failed = |e: std::io::Error| {
                let e = crate::error::Error::Io(format!("cannot read the copy of the store: {e}"));
                let _ = tx.blocking_send(Err(Status::from(e)));
            };
            let mut file = match snap.file.reopen() {
                Ok(f) => f,
                Err(e) => return failed(e),
            };
            let mut first = Some(snap.about);
            loop {
                let mut data = vec![0; BACKUP_CHUNK];
                let n = match file.read(&mut data) {
                    Ok(n) => n,
                    Err(e) => return failed(e),
                };
                if n == 0 && first.is_none() {
                    return;
                }
                data.truncate(n);
                let mut chunk = proto::BackupChunk {
                    data,
                    ..Default::default()
                };
                if let Some(a) = first.take() {
                    chunk.size = snap.size;
                    chunk.store_id = a.store_id;
                    chunk.audit_seq = a.audit_seq;
                    chunk.audit_time = a.audit_time;
                }
                // A client that stops reading would keep the copy (and the
                // one place for a backup) for good.
                let sent = rt.block_on(tokio::time::timeout(BACKUP_STALL, tx.send(Ok(chunk))));
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::warn!(
                            "a backup client read nothing for {}s; its copy was dropped",
                            BACKUP_STALL.as_secs()
                        );
                        return;
                    }
                }
            }
            // (The copy is removed, and the place freed, when `snap` drops
            // here.)
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn unseal(
        &self,
        req: Request<proto::UnsealRequest>,
    ) -> Result<Response<proto::UnsealResponse>, Status> {
        Ok(Response::new(self.gate.unseal(&req.get_ref().share).await?))
    }

    async fn status(
        &self,
        req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        if self.gate.broker().is_none() {
            let (received, threshold) = self.gate.progress();
            return Ok(Response::new(proto::StatusResponse {
                sealed: true,
                unseal_source: "shares".into(),
                unseal_received: received,
                unseal_threshold: threshold,
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            }));
        }
        let rid = self.admin(&req, "status", "broker").await?;
        let broker = self.broker()?;
        let status = broker.status()?;
        self.read_done(ACTOR_ADMIN.into(), "status", "broker", &rid, 1)
            .await?;
        Ok(Response::new(status))
    }
}

/// Runs `work` as a task of its own, so that a client that goes away (a
/// Ctrl-C) does not cancel it half-way: a rotation whose command has
/// already changed the credential at its provider must still store the
/// output and release its lock. A shutdown waits for it (see
/// [`Broker::detached_done`]).
async fn detached<T: Send + 'static>(
    broker: &Broker,
    work: impl std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
) -> Result<T, Status> {
    let running = Arc::clone(&broker.detached).read_owned().await;
    let work = async move {
        let _running = running;
        work.await
    };
    match tokio::spawn(work).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(Status::from(Error::Internal(format!(
            "the work stopped: {e}"
        )))),
    }
}

/// A metadata value as text, if present.
fn meta<'r, T>(req: &'r Request<T>, key: &str) -> Option<&'r str> {
    req.metadata().get(key).and_then(|v| v.to_str().ok())
}

impl Services {
    /// Audits a read that was allowed and answered.
    async fn read_done(
        &self,
        actor: String,
        action: &str,
        target: &str,
        request_id: &str,
        items: usize,
    ) -> Result<(), Status> {
        let entry = crate::audit::Entry {
            time: crate::init::now(),
            actor,
            action: action.into(),
            target: target.into(),
            allowed: true,
            reason: format!("{items} read"),
            request_id: request_id.into(),
        };
        Ok(self.broker()?.audit(entry).await?)
    }

    async fn holder<T>(
        &self,
        req: &Request<T>,
        (method, action): (&str, &str),
        target: &str,
    ) -> Result<(String, HolderCaller), Status> {
        let rid = request_id(req);
        let holder = self
            .broker()?
            .authenticate_holder(
                meta(req, "x-tessera-holder"),
                meta(req, "x-tessera-holder-time"),
                meta(req, "x-tessera-holder-signature"),
                (method, action),
                target,
                &rid,
            )
            .await?;
        Ok((rid, holder))
    }
}

#[tonic::async_trait]
impl retention_server::Retention for Services {
    async fn enroll_holder(
        &self,
        req: Request<proto::EnrollHolderRequest>,
    ) -> Result<Response<proto::HolderInfo>, Status> {
        let rid = self
            .admin(&req, "holder.enroll", &req.get_ref().role)
            .await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.broker()?.enroll_holder(&rid, r.role, r.pubkey).await?,
        ))
    }

    async fn replace_holder(
        &self,
        req: Request<proto::EnrollHolderRequest>,
    ) -> Result<Response<proto::ReplaceHolderResponse>, Status> {
        let rid = self
            .admin(&req, "holder.replace", &req.get_ref().role)
            .await?;
        let r = req.into_inner();
        let (holder, rekeyed, cancelled) = self
            .broker()?
            .replace_holder(&rid, r.role, r.pubkey)
            .await?;
        Ok(Response::new(proto::ReplaceHolderResponse {
            holder: Some(holder),
            rekeyed,
            cancelled,
        }))
    }

    async fn list_holders(
        &self,
        req: Request<proto::ListHoldersRequest>,
    ) -> Result<Response<proto::ListHoldersResponse>, Status> {
        let rid = self.admin(&req, "holder.list", "*").await?;
        let holders = self.broker()?.list_holders(&rid).await?;
        Ok(Response::new(proto::ListHoldersResponse { holders }))
    }

    async fn create_class(
        &self,
        req: Request<proto::CreateClassRequest>,
    ) -> Result<Response<proto::ClassInfo>, Status> {
        let rid = self
            .admin(&req, "class.create", &req.get_ref().name)
            .await?;
        Ok(Response::new(
            self.broker()?.create_class(&rid, req.into_inner()).await?,
        ))
    }

    async fn recover_class(
        &self,
        req: Request<proto::RecoverClassRequest>,
    ) -> Result<Response<proto::ClassInfo>, Status> {
        let rid = self
            .admin(&req, "class.recover", &req.get_ref().name)
            .await?;
        Ok(Response::new(
            self.broker()?.recover_class(&rid, req.into_inner()).await?,
        ))
    }

    async fn list_classes(
        &self,
        req: Request<proto::ListClassesRequest>,
    ) -> Result<Response<proto::ListClassesResponse>, Status> {
        let rid = self.admin(&req, "class.list", "*").await?;
        let classes = self.broker()?.list_classes(&rid).await?;
        Ok(Response::new(proto::ListClassesResponse { classes }))
    }

    async fn get_class(
        &self,
        req: Request<proto::GetClassRequest>,
    ) -> Result<Response<proto::ClassInfo>, Status> {
        let rid = self.admin(&req, "class.show", &req.get_ref().name).await?;
        let name = req.into_inner().name;
        let info = self.broker()?.class_info(&name)?;
        self.read_done(ACTOR_ADMIN.into(), "class.show", &name, &rid, 1)
            .await?;
        Ok(Response::new(info))
    }

    async fn place_hold(
        &self,
        req: Request<proto::HoldRequest>,
    ) -> Result<Response<proto::HoldInfo>, Status> {
        let rid = self.admin(&req, "hold.place", &req.get_ref().class).await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.broker()?.place_hold(&rid, r.class, r.reason).await?,
        ))
    }

    async fn release_hold(
        &self,
        req: Request<proto::HoldRequest>,
    ) -> Result<Response<proto::HoldInfo>, Status> {
        let rid = self
            .admin(&req, "hold.release", &req.get_ref().class)
            .await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.broker()?
                .release_hold(&rid, r.class, r.hold, r.reason)
                .await?,
        ))
    }

    async fn open_shred(
        &self,
        req: Request<proto::OpenShredRequest>,
    ) -> Result<Response<proto::CeremonyInfo>, Status> {
        let rid = self.admin(&req, "shred.open", &req.get_ref().class).await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.broker()?
                .open_shred(
                    &rid,
                    ACTOR_ADMIN,
                    r.class,
                    r.reason,
                    r.early,
                    r.expires_seconds,
                )
                .await?,
        ))
    }

    async fn get_certificate(
        &self,
        req: Request<proto::GetCertificateRequest>,
    ) -> Result<Response<proto::CertificateResponse>, Status> {
        let rid = self
            .admin(&req, "shred.certificate", &req.get_ref().class)
            .await?;
        let class = req.into_inner().class;
        let cert = self.broker()?.certificate(&class)?;
        self.read_done(ACTOR_ADMIN.into(), "shred.certificate", &class, &rid, 1)
            .await?;
        Ok(Response::new(cert))
    }
}

#[tonic::async_trait]
impl holders_server::Holders for Services {
    async fn export_share(
        &self,
        req: Request<proto::ExportShareRequest>,
    ) -> Result<Response<proto::ExportShareResponse>, Status> {
        let (rid, holder) = self
            .holder(&req, ("ExportShare", "share.export"), &req.get_ref().class)
            .await?;
        Ok(Response::new(
            self.broker()?
                .export_share(&rid, &holder, req.into_inner().class)
                .await?,
        ))
    }

    async fn get_ceremony(
        &self,
        req: Request<proto::GetCeremonyRequest>,
    ) -> Result<Response<proto::CeremonyInfo>, Status> {
        let (rid, holder) = self
            .holder(&req, ("GetCeremony", "shred.show"), &req.get_ref().ceremony)
            .await?;
        Ok(Response::new(
            self.broker()?
                .get_ceremony(&rid, &holder, &req.into_inner().ceremony)
                .await?,
        ))
    }

    async fn join_shred(
        &self,
        req: Request<proto::JoinShredRequest>,
    ) -> Result<Response<proto::CeremonyInfo>, Status> {
        let (rid, holder) = self
            .holder(&req, ("JoinShred", "shred.join"), &req.get_ref().ceremony)
            .await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.broker()?
                .join_shred(&rid, &holder, r.ceremony, &r.signature)
                .await?,
        ))
    }

    async fn get_certificate(
        &self,
        req: Request<proto::GetCertificateRequest>,
    ) -> Result<Response<proto::CertificateResponse>, Status> {
        let (rid, holder) = self
            .holder(
                &req,
                ("GetCertificate", "shred.certificate"),
                &req.get_ref().class,
            )
            .await?;
        let class = req.into_inner().class;
        let cert = self.broker()?.certificate(&class)?;
        self.read_done(holder.actor(), "shred.certificate", &class, &rid, 1)
            .await?;
        Ok(Response::new(cert))
    }

    async fn confirm_shred(
        &self,
        req: Request<proto::ConfirmShredRequest>,
    ) -> Result<Response<proto::CertificateResponse>, Status> {
        let (rid, holder) = self
            .holder(
                &req,
                ("ConfirmShred", "shred.confirm"),
                &req.get_ref().class,
            )
            .await?;
        let r = req.into_inner();
        Ok(Response::new(
            self.broker()?
                .confirm_shred(&rid, &holder, r.class, &r.signature)
                .await?,
        ))
    }
}

#[tonic::async_trait]
impl envelope_server::Envelope for Services {
    async fn encrypt(
        &self,
        req: Request<proto::EncryptRequest>,
    ) -> Result<Response<proto::EncryptResponse>, Status> {
        let (rid, agent) = self
            .agent(&req, "envelope.encrypt", &req.get_ref().class)
            .await?;
        Ok(Response::new(
            self.broker()?
                .encrypt(&rid, &agent, req.into_inner())
                .await?,
        ))
    }

    async fn decrypt(
        &self,
        req: Request<proto::DecryptRequest>,
    ) -> Result<Response<proto::DecryptResponse>, Status> {
        let (rid, agent) = self
            .agent(&req, "envelope.decrypt", &req.get_ref().class)
            .await?;
        Ok(Response::new(
            self.broker()?
                .decrypt(&rid, &agent, req.into_inner())
                .await?,
        ))
    }

    async fn generate_data_key(
        &self,
        req: Request<proto::GenerateDataKeyRequest>,
    ) -> Result<Response<proto::GenerateDataKeyResponse>, Status> {
        let (rid, agent) = self
            .agent(&req, "envelope.datakey", &req.get_ref().class)
            .await?;
        Ok(Response::new(
            self.broker()?
                .generate_data_key(&rid, &agent, req.into_inner())
                .await?,
        ))
    }
}
