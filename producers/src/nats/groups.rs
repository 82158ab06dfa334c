//! Where JetStream consumer groups keep their coordination state: one KV
//! bucket, [`BUCKET`], shared by every topic and group.
//!
//! | key | value |
//! |---|---|
//! | `<topic>.<group>.members.<member>` | [`MemberRecord`], re-put every heartbeat |
//! | `<topic>.<group>.partitions.<p>` | [`LeaseRecord`]: the owner and the resume position |
//! | `=clock` | empty: written by admin commands to read the server's clock (liveness) |
//!
//! A lease changes hands only by compare-and-set on its revision, which
//! fences a member that lost it: its next renewal fails. Each partition is
//! read through the durable pull consumer [`consumer_name`]; its ack floor is
//! the group's committed position.

use serde::{Deserialize, Serialize};

/// The KV bucket of group membership and partition leases.
pub const BUCKET: &str = "KEEL_GROUPS";

/// A member's heartbeat.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberRecord {
    /// The member id.
    pub member: String,
    /// Host name, for operators.
    #[serde(default)]
    pub host: String,
    /// Process id, for operators.
    #[serde(default)]
    pub pid: u32,
    /// Drawn by each subscription at random: two records of one member id
    /// with different tokens come from two processes (static membership).
    #[serde(default)]
    pub token: String,
    /// The bucket revision of this subscription's first heartbeat (0 in
    /// that first one, whose own revision it is): of two processes under
    /// one member id, the one that joined later keeps it.
    #[serde(default)]
    pub joined: u64,
}

impl MemberRecord {
    /// Where the member runs, for messages: `host h, pid 7` (`pid 7` when
    /// the host name is unknown).
    pub fn whereabouts(&self) -> String {
        match self.host.as_str() {
            "" => format!("pid {}", self.pid),
            host => format!("host {host}, pid {}", self.pid),
        }
    }
}

/// A partition's lease.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The member holding it; `None` once released.
    pub owner: Option<String>,
    /// The first stream sequence not yet known handled: where the next
    /// owner starts when the partition's durable consumer is missing.
    pub resume: Option<u64>,
    /// What a member handing the lease over had settled past `resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_on: Option<HandedOn>,
}

/// The events a member handing a partition over settled (handled, or
/// dead-lettered) past the oldest one still open (another key's): the next
/// owner, which reads from the ack floor, settles them again as they come
/// instead of handling them twice. Written only once the server's ack floor
/// had taken every ack below `resume`, and only with no settled event past
/// it left out, so skipping them keeps each key's order; valid only on the
/// very durable consumer it was checked against.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandedOn {
    /// The durable consumer's creation time (RFC 3339).
    pub consumer: String,
    /// Stream sequences, ascending.
    pub settled: Vec<u64>,
}

/// The key prefix of a group on a topic.
pub fn group_prefix(topic: &str, group: &str) -> String {
    format!("{topic}.{group}")
}

/// The heartbeat key of `member`.
pub fn member_key(topic: &str, group: &str, member: &str) -> String {
    format!("{topic}.{group}.members.{member}")
}

/// The lease key of `partition`.
pub fn lease_key(topic: &str, group: &str, partition: u32) -> String {
    format!("{topic}.{group}.partitions.{partition}")
}

/// What a key of a group is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupKey {
    /// A member's heartbeat.
    Member(String),
    /// A partition's lease.
    Lease(u32),
}

/// Parses a key under [`group_prefix`]; `None` for other keys.
pub fn parse_key(topic: &str, group: &str, key: &str) -> Option<GroupKey> {
    let rest = key
        .strip_prefix(&group_prefix(topic, group))?
        .strip_prefix('.')?;
    if let Some(member) = rest.strip_prefix("members.") {
        return Some(GroupKey::Member(member.to_owned()));
    }
    rest.strip_prefix("partitions.")?
        .parse()
        .ok()
        .map(GroupKey::Lease)
}

/// The durable consumer that reads `partition` for `group`.
pub fn consumer_name(group: &str, partition: u32) -> String {
    format!("{group}_p{partition}")
}

/// The subject of `partition` of `topic`.
pub fn partition_subject(topic: &str, partition: u32) -> String {
    format!("{topic}.{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        assert_eq!(
            parse_key("t", "g", &member_key("t", "g", "m-1")),
            Some(GroupKey::Member("m-1".into()))
        );
        assert_eq!(
            parse_key("t", "g", &lease_key("t", "g", 7)),
            Some(GroupKey::Lease(7))
        );
        assert_eq!(parse_key("t", "g", &lease_key("t", "g2", 7)), None);
        assert_eq!(parse_key("t", "g", "t.g.partitions.x"), None);
    }
}
