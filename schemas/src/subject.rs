//! Subject name strategies: which registry subject a topic's schema lives
//! under, as Confluent's serializers name them.

use std::fmt;
use std::str::FromStr;

use crate::error::SchemaError;

/// How a (topic, record type) pair maps to a registry subject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SubjectNameStrategy {
    /// `<topic>-value`: one schema lineage per topic (Confluent's default,
    /// `TopicNameStrategy`). Several event types on one topic then need a
    /// union schema.
    #[default]
    TopicName,
    /// `<record full name>`: one lineage per event type, whatever the topic
    /// (`RecordNameStrategy`).
    RecordName,
    /// `<topic>-<record full name>`: one lineage per event type per topic,
    /// so a topic can carry several event types (`TopicRecordNameStrategy`).
    TopicRecordName,
}

impl SubjectNameStrategy {
    /// The subject of a value of type `record` (Avro full name) on `topic`.
    pub fn subject(&self, topic: &str, record: &str) -> String {
        match self {
            SubjectNameStrategy::TopicName => format!("{topic}-value"),
            SubjectNameStrategy::RecordName => record.to_owned(),
            SubjectNameStrategy::TopicRecordName => format!("{topic}-{record}"),
        }
    }
}

impl FromStr for SubjectNameStrategy {
    type Err = SchemaError;

    /// Accepts `topic-name`, `record-name`, `topic-record-name` and
    /// Confluent's class names (`TopicNameStrategy`, …).
    fn from_str(s: &str) -> Result<Self, SchemaError> {
        let short = s.rsplit('.').next().unwrap_or(s);
        match short {
            "topic-name" | "TopicNameStrategy" => Ok(SubjectNameStrategy::TopicName),
            "record-name" | "RecordNameStrategy" => Ok(SubjectNameStrategy::RecordName),
            "topic-record-name" | "TopicRecordNameStrategy" => {
                Ok(SubjectNameStrategy::TopicRecordName)
            }
            _ => Err(SchemaError::UnknownStrategy(s.to_owned())),
        }
    }
}

impl fmt::Display for SubjectNameStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SubjectNameStrategy::TopicName => "topic-name",
            SubjectNameStrategy::RecordName => "record-name",
            SubjectNameStrategy::TopicRecordName => "topic-record-name",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_confluent_naming() {
        let r = "shop.orders.OrderPlaced";
        assert_eq!(
            SubjectNameStrategy::TopicName.subject("orders", r),
            "orders-value"
        );
        assert_eq!(SubjectNameStrategy::RecordName.subject("orders", r), r);
        assert_eq!(
            SubjectNameStrategy::TopicRecordName.subject("orders", r),
            "orders-shop.orders.OrderPlaced"
        );
        for s in ["topic-name", "record-name", "topic-record-name"] {
            assert_eq!(s.parse::<SubjectNameStrategy>().unwrap().to_string(), s);
        }
        assert_eq!(
            "io.confluent.kafka.serializers.subject.TopicRecordNameStrategy"
                .parse::<SubjectNameStrategy>()
                .unwrap(),
            SubjectNameStrategy::TopicRecordName
        );
        let refused = "by-topic"
            .parse::<SubjectNameStrategy>()
            .unwrap_err()
            .to_string();
        assert!(
            refused.starts_with("unknown subject name strategy `by-topic`"),
            "{refused}"
        );
    }
}
