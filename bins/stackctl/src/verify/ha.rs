//! Redis behind Sentinel (compose profile `ha`, or any `redis+sentinel://`
//! URL), as `verify` sees it: each sentinel the services' URL names is
//! asked from this host (a service of the project through its container's
//! address, any other host by name) which master it monitors and whether
//! it can fail it over (`SENTINEL CKQUORUM`); the master they name is where the
//! other Redis checks read (`master_url`); its `INFO replication` shows
//! whether a replica is in sync.

use super::checks::{Check, Probe};
use crate::compose::Project;
use crate::engine::{ContainerInfo, Engine};
use crate::plan::labels;
use std::collections::BTreeMap;
use std::time::Duration;
use taskstack::broker::Broker;
use taskstack::config::SentinelTarget;

/// A replica counts as in sync when it acknowledged the master's stream
/// this recently (`lag`, seconds; Redis's replicas acknowledge every second).
pub const MAX_LAG_S: u64 = 10;
/// Every question to a sentinel is bounded by this.
const DEADLINE: Duration = Duration::from_secs(5);

/// What one sentinel answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelFacts {
    /// As the URL names it (`sentinel-1:26379`).
    pub sentinel: String,
    pub answer: Probe<SentinelAnswer>,
}

/// A sentinel's view of the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelAnswer {
    /// The master it names (host, port).
    pub master: (String, u16),
    /// Its `SENTINEL CKQUORUM` reply (Err: the sentinel's refusal).
    pub quorum: Result<String, String>,
    /// The replicas it knows and could promote (`SENTINEL REPLICAS`:
    /// flagged neither down nor disconnected), as `ip:port`.
    pub promotable: Vec<String>,
}

/// A replica as the master's `INFO replication` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaFacts {
    pub addr: String,
    pub state: String,
    pub lag_s: u64,
}

/// The profile's facts.
#[derive(Debug, Clone)]
pub struct HaFacts {
    pub master_name: String,
    pub sentinels: Vec<SentinelFacts>,
    pub replicas: Probe<Vec<ReplicaFacts>>,
    /// The service at each address of the project's running containers.
    pub services: BTreeMap<String, String>,
}

/// Where this host reaches `host:port`: an IP address as it is (the
/// sentinels name the nodes by address), a service of the project at its
/// running container among `running`, any other host by its name (a
/// Sentinel outside the project).
async fn reach<E: Engine>(
    engine: &E,
    project: &Project,
    running: &[&ContainerInfo],
    host: &str,
    port: u16,
) -> Probe<String> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, port).to_string());
    }
    if !project.services.contains_key(host) {
        return Ok(format!("{host}:{port}"));
    }
    let c = running
        .iter()
        .find(|c| c.label(labels::SERVICE) == Some(host))
        .ok_or_else(|| format!("no running container of service {host}"))?;
    engine
        .reach(&c.id, port)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} has no network address this host reaches", c.name))
}

/// The service of each running container's address (for naming the
/// addresses the sentinels and the master report).
async fn service_addresses<E: Engine>(
    engine: &E,
    running: &[&ContainerInfo],
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for c in running {
        let (Some(service), Ok(Some(addr))) =
            (c.label(labels::SERVICE), engine.reach(&c.id, 0).await)
        else {
            continue;
        };
        if let Some((ip, _)) = addr.rsplit_once(':') {
            out.insert(ip.trim_matches(['[', ']']).to_owned(), service.to_owned());
        }
    }
    out
}

/// `addr` (`ip:port`) with the service at that address, when known:
/// `redis (172.20.0.3:6379)`.
fn named(services: &BTreeMap<String, String>, addr: &str) -> String {
    let ip = addr
        .rsplit_once(':')
        .map_or(addr, |(ip, _)| ip)
        .trim_matches(['[', ']']);
    match services.get(ip) {
        Some(service) => format!("{service} ({addr})"),
        None => addr.to_owned(),
    }
}

/// Asks each of `target`'s sentinels (see the module docs).
async fn ask_sentinels<E: Engine>(
    engine: &E,
    project: &Project,
    running: &[&ContainerInfo],
    target: &SentinelTarget,
) -> Vec<SentinelFacts> {
    let mut out = Vec::new();
    for (host, port) in &target.sentinels {
        let answer = match reach(engine, project, running, host, *port).await {
            Err(e) => Err(e),
            Ok(_) if target.tls => Err("verify asks sentinels over plain TCP only".into()),
            Ok(addr) => tokio::time::timeout(DEADLINE, ask(&addr, target))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {DEADLINE:?}"))),
        };
        out.push(SentinelFacts {
            sentinel: format!("{host}:{port}"),
            answer,
        });
    }
    out
}

/// One sentinel at `addr`: the master it names, its quorum check and the
/// replicas it could promote.
async fn ask(addr: &str, target: &SentinelTarget) -> Probe<SentinelAnswer> {
    let client = redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    if let Some(pw) = &target.sentinel_password {
        redis::cmd("AUTH")
            .arg(pw.expose())
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("AUTH: {e}"))?;
    }
    let master: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(&target.master_name)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("SENTINEL GET-MASTER-ADDR-BY-NAME: {e}"))?;
    let (host, port) =
        master.ok_or_else(|| format!("monitors no master named {}", target.master_name))?;
    let quorum = redis::cmd("SENTINEL")
        .arg("CKQUORUM")
        .arg(&target.master_name)
        .query_async::<String>(&mut conn)
        .await
        .map_err(|e| e.to_string());
    let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
        .arg("REPLICAS")
        .arg(&target.master_name)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("SENTINEL REPLICAS: {e}"))?;
    Ok(SentinelAnswer {
        master: (host, port),
        quorum,
        promotable: promotable(&replicas),
    })
}

/// Of `SENTINEL REPLICAS`' entries (each a flat field/value list), the
/// addresses of those not flagged down or disconnected.
fn promotable(replicas: &[Vec<String>]) -> Vec<String> {
    replicas
        .iter()
        .filter_map(|fields| {
            let get = |name: &str| {
                fields
                    .chunks(2)
                    .find(|kv| kv[0] == name)
                    .and_then(|kv| kv.get(1))
                    .map(String::as_str)
            };
            let down = get("flags")?
                .split(',')
                .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"));
            (!down).then_some(format!("{}:{}", get("ip")?, get("port")?))
        })
        .collect()
}

/// The master the first answering sentinel names.
fn named_master(sentinels: &[SentinelFacts]) -> Probe<(String, u16)> {
    sentinels
        .iter()
        .find_map(|s| s.answer.as_ref().ok().map(|a| a.master.clone()))
        .ok_or_else(|| {
            let why: Vec<String> = sentinels
                .iter()
                .filter_map(|s| {
                    s.answer
                        .as_ref()
                        .err()
                        .map(|e| format!("{}: {e}", s.sentinel))
                })
                .collect();
            format!("no sentinel names the master ({})", why.join("; "))
        })
}

/// `target`'s master as a plain `redis://` URL this host reaches: the
/// master's user and password from the target, its database, and the
/// address of the container of the service the sentinels name.
async fn master_url<E: Engine>(
    engine: &E,
    project: &Project,
    running: &[&ContainerInfo],
    target: &SentinelTarget,
    master: &Probe<(String, u16)>,
) -> Probe<String> {
    let (host, port) = master.as_ref().map_err(Clone::clone)?;
    let addr = reach(engine, project, running, host, *port).await?;
    let mut url = url::Url::parse(&format!("redis://{addr}/{}", target.db))
        .map_err(|e| format!("{addr}: {e}"))?;
    if let Some(user) = &target.username {
        url.set_username(user)
            .map_err(|()| "the master's user does not fit a URL".to_owned())?;
    }
    if let Some(pw) = &target.password {
        url.set_password(Some(pw.expose()))
            .map_err(|()| "the master's password does not fit a URL".to_owned())?;
    }
    Ok(url.into())
}

/// The broker `verify` reads Redis through (`store::connect`)
/// and, when `config`'s broker or result backend is a Sentinel URL, the
/// sentinels' answers: the broker then reads the master they name.
pub async fn connect<E: Engine>(
    engine: &E,
    project: &Project,
    running: &[&ContainerInfo],
    config: Probe<taskstack::config::Config>,
) -> (Probe<Broker>, Option<HaFacts>) {
    let target = config.as_ref().ok().and_then(|c| {
        [c.broker_target(), c.backend_target()]
            .into_iter()
            .filter_map(Result::ok)
            .find_map(|t| t.sentinel().cloned())
    });
    let (config, target) = match (config, target) {
        (Err(e), _) => return (Err(e), None),
        (Ok(c), None) => {
            return (
                super::store::connect(engine, project, running, c).await,
                None,
            );
        }
        (Ok(c), Some(t)) => (c, t),
    };
    let sentinels = ask_sentinels(engine, project, running, &target).await;
    let master = named_master(&sentinels);
    let broker = match direct(engine, project, running, config, &target, &master).await {
        Ok(c) => super::store::connect(engine, project, running, c).await,
        Err(e) => Err(format!("the master behind the sentinels: {e}")),
    };
    let facts = HaFacts {
        master_name: target.master_name.clone(),
        sentinels,
        replicas: replicas(&broker).await,
        services: service_addresses(engine, running).await,
    };
    (broker, Some(facts))
}

/// `config` with each `redis+sentinel://` URL (broker, result backend)
/// replaced by the [`master_url`] its sentinels name (`known`: the master
/// already asked for `known_target`), so the library reads the master from
/// this host; the passwords move into the URLs and the sentinels' password
/// is dropped (nothing uses it then).
async fn direct<E: Engine>(
    engine: &E,
    project: &Project,
    running: &[&ContainerInfo],
    mut config: taskstack::config::Config,
    known_target: &SentinelTarget,
    known: &Probe<(String, u16)>,
) -> Probe<taskstack::config::Config> {
    use taskstack::config::is_sentinel_url;
    use taskstack::secret::SecretUrl;
    let master_of = async |target: SentinelTarget| -> Probe<String> {
        let master = if &target == known_target {
            known.clone()
        } else {
            named_master(&ask_sentinels(engine, project, running, &target).await)
        };
        master_url(engine, project, running, &target, &master).await
    };
    let target_of = |t: Result<taskstack::config::RedisTarget, taskstack::config::ConfigError>| {
        t.map_err(|e| e.to_string()).and_then(|t| {
            t.sentinel()
                .cloned()
                .ok_or_else(|| "not a Sentinel URL".into())
        })
    };
    if is_sentinel_url(config.broker_url.expose()) {
        let url = master_of(target_of(config.broker_target())?).await?;
        config.broker_url = SecretUrl::new(url);
        config.broker_password = None;
        config.broker_password_file = None;
    }
    if config
        .result_backend
        .as_ref()
        .is_some_and(|u| is_sentinel_url(u.expose()))
    {
        let url = master_of(target_of(config.backend_target())?).await?;
        config.result_backend = Some(SecretUrl::new(url));
        config.result_backend_password = None;
        config.result_backend_password_file = None;
    }
    config.sentinel_password = None;
    config.sentinel_password_file = None;
    Ok(config)
}

/// The replicas the master lists (`INFO replication` through `broker`).
async fn replicas(broker: &Probe<Broker>) -> Probe<Vec<ReplicaFacts>> {
    let broker = broker.as_ref().map_err(|e| format!("replicas: {e}"))?;
    let info: String = tokio::time::timeout(DEADLINE, async {
        let mut conn = broker
            .broker_pool()
            .get("INFO replication")
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("INFO replication: {e}"))
    })
    .await
    .unwrap_or_else(|_| Err(format!("INFO replication: no answer within {DEADLINE:?}")))?;
    Ok(parse_replicas(&info))
}

/// The `slaveN:ip=...,port=...,state=...,offset=...,lag=...` lines.
fn parse_replicas(info: &str) -> Vec<ReplicaFacts> {
    info.lines()
        .filter_map(|l| {
            let (key, fields) = l.trim_end().split_once(':')?;
            let n = key.strip_prefix("slave")?;
            n.parse::<u32>().ok()?;
            let field = |name: &str| {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .unwrap_or_default()
            };
            Some(ReplicaFacts {
                addr: format!("{}:{}", field("ip"), field("port")),
                state: field("state").to_owned(),
                lag_s: field("lag").parse().unwrap_or(u64::MAX),
            })
        })
        .collect()
}

/// `ha.sentinels` and `ha.replica`.
pub fn evaluate(f: &HaFacts) -> Vec<Check> {
    let check = |id: &str, ok: bool, reason: String| Check {
        id: id.into(),
        ok,
        reason,
    };
    let mut problems = Vec::new();
    let mut masters = std::collections::BTreeSet::new();
    for s in &f.sentinels {
        match &s.answer {
            Err(e) => problems.push(format!("{}: {e}", s.sentinel)),
            Ok(a) => {
                let (host, port) = &a.master;
                masters.insert(named(&f.services, &format!("{host}:{port}")));
                if let Err(e) = &a.quorum {
                    problems.push(format!("{}: {e}", s.sentinel));
                }
                if a.promotable.is_empty() {
                    problems.push(format!(
                        "{}: knows no replica it could promote (SENTINEL REPLICAS; \
                         it learns them from the master's INFO every 10 s)",
                        s.sentinel
                    ));
                }
            }
        }
    }
    if masters.len() > 1 {
        problems.push(format!(
            "the sentinels name different masters: {}",
            masters.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let sentinels = if f.sentinels.is_empty() {
        check("ha.sentinels", false, "the URL names no sentinel".into())
    } else if problems.is_empty() {
        check(
            "ha.sentinels",
            true,
            format!(
                "{} of {} sentinels name {} the master of {}, can fail it over (CKQUORUM) \
                 and know a replica to promote",
                f.sentinels.len(),
                f.sentinels.len(),
                masters.iter().next().map_or("", String::as_str),
                f.master_name
            ),
        )
    } else {
        check("ha.sentinels", false, problems.join("; "))
    };
    let replica = match &f.replicas {
        Err(e) => check("ha.replica", false, e.clone()),
        Ok(list) => {
            let shown: Vec<String> = list
                .iter()
                .map(|r| {
                    format!(
                        "{} {} lag {} s",
                        named(&f.services, &r.addr),
                        r.state,
                        r.lag_s
                    )
                })
                .collect();
            let in_sync = list
                .iter()
                .filter(|r| r.state == "online" && r.lag_s <= MAX_LAG_S)
                .count();
            if in_sync > 0 {
                check(
                    "ha.replica",
                    true,
                    format!(
                        "{in_sync} replica(s) in sync with the master: {}",
                        shown.join(", ")
                    ),
                )
            } else if list.is_empty() {
                check(
                    "ha.replica",
                    false,
                    "the master has no replica: a failover would have nothing to promote".into(),
                )
            } else {
                check(
                    "ha.replica",
                    false,
                    format!(
                        "no replica online within {MAX_LAG_S} s of the master: {}",
                        shown.join(", ")
                    ),
                )
            }
        }
    };
    vec![sentinels, replica]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(name: &str, master: &str, quorum: Result<&str, &str>) -> SentinelFacts {
        SentinelFacts {
            sentinel: format!("{name}:26379"),
            answer: Ok(SentinelAnswer {
                master: (master.into(), 6379),
                quorum: quorum.map(str::to_owned).map_err(str::to_owned),
                promotable: vec!["10.0.0.3:6379".into()],
            }),
        }
    }

    #[test]
    fn a_replica_flagged_down_or_disconnected_cannot_be_promoted() {
        let entry = |ip: &str, flags: &str| {
            [
                "name", "x", "ip", ip, "port", "6379", "runid", "r", "flags", flags,
            ]
            .map(String::from)
            .to_vec()
        };
        assert_eq!(
            promotable(&[
                entry("10.0.0.3", "slave"),
                entry("10.0.0.4", "s_down,slave,disconnected"),
                entry("10.0.0.5", "slave,disconnected"),
            ]),
            vec!["10.0.0.3:6379".to_owned()]
        );
    }

    fn facts(sentinels: Vec<SentinelFacts>, replicas: Probe<Vec<ReplicaFacts>>) -> HaFacts {
        HaFacts {
            master_name: "taskstack".into(),
            sentinels,
            replicas,
            services: BTreeMap::from([
                ("10.0.0.2".to_owned(), "redis".to_owned()),
                ("10.0.0.3".to_owned(), "redis-replica".to_owned()),
            ]),
        }
    }

    #[test]
    fn info_replication_gives_each_replica() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
                    slave0:ip=redis-replica,port=6379,state=online,offset=1234,lag=0\r\n\
                    slave1:ip=10.0.0.7,port=6380,state=wait_bgsave,offset=0,lag=12\r\n\
                    master_failover_state:no-failover\r\n";
        assert_eq!(
            parse_replicas(info),
            vec![
                ReplicaFacts {
                    addr: "redis-replica:6379".into(),
                    state: "online".into(),
                    lag_s: 0
                },
                ReplicaFacts {
                    addr: "10.0.0.7:6380".into(),
                    state: "wait_bgsave".into(),
                    lag_s: 12
                },
            ]
        );
    }

    #[test]
    fn the_checks_pass_only_with_agreeing_sentinels_at_quorum_and_a_replica_in_sync() {
        let ok = "OK 3 usable Sentinels. Quorum and failover authorization can be reached";
        let online = |lag_s| {
            Ok(vec![ReplicaFacts {
                addr: "10.0.0.3:6379".into(),
                state: "online".into(),
                lag_s,
            }])
        };
        let three = |m2: &str, q3: Result<&'static str, &'static str>| {
            vec![
                sentinel("sentinel-1", "10.0.0.2", Ok(ok)),
                sentinel("sentinel-2", m2, Ok(ok)),
                sentinel("sentinel-3", "10.0.0.2", q3),
            ]
        };
        let good = evaluate(&facts(three("10.0.0.2", Ok(ok)), online(0)));
        assert!(good.iter().all(|c| c.ok), "{good:?}");
        assert!(
            good[0]
                .reason
                .starts_with("3 of 3 sentinels name redis (10.0.0.2:6379) the master"),
            "{}",
            good[0].reason
        );
        assert!(
            good[1]
                .reason
                .contains("redis-replica (10.0.0.3:6379) online lag 0 s"),
            "{}",
            good[1].reason
        );

        let split = evaluate(&facts(three("10.0.0.3", Ok(ok)), online(0)));
        assert!(!split[0].ok && split[0].reason.contains("different masters"));
        assert!(split[0].reason.contains("redis-replica (10.0.0.3:6379)"));

        let no_quorum = evaluate(&facts(
            three("10.0.0.2", Err("NOQUORUM 1 usable Sentinels")),
            online(0),
        ));
        assert!(!no_quorum[0].ok && no_quorum[0].reason.contains("sentinel-3:26379: NOQUORUM"));

        let mut unaware = three("10.0.0.2", Ok(ok));
        if let Ok(a) = &mut unaware[2].answer {
            a.promotable.clear();
        }
        let unaware = evaluate(&facts(unaware, online(0)));
        assert!(
            !unaware[0].ok
                && unaware[0]
                    .reason
                    .contains("sentinel-3:26379: knows no replica")
        );

        let mut down = three("10.0.0.2", Ok(ok));
        down[1].answer = Err("no running container of service sentinel-2".into());
        let down = evaluate(&facts(down, online(0)));
        assert!(!down[0].ok && down[0].reason.contains("sentinel-2"));

        let behind = evaluate(&facts(three("10.0.0.2", Ok(ok)), online(MAX_LAG_S + 1)));
        assert!(!behind[1].ok && behind[1].reason.contains("no replica online"));
        let none = evaluate(&facts(three("10.0.0.2", Ok(ok)), Ok(Vec::new())));
        assert!(!none[1].ok && none[1].reason.contains("no replica"));
        assert!(!evaluate(&facts(Vec::new(), online(0)))[0].ok);
    }
}
