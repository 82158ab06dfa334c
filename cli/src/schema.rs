//! `keel schema`: register, check, inspect and compare Avro schemas in any
//! Confluent-compatible registry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use keel_schemas::canonical::{References, named_types, resolve, resolve_with_usage};
use keel_schemas::diff::diff;
use keel_schemas::server::store::SchemaReference;
use keel_schemas::{RegistryClient, SubjectNameStrategy};
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub(crate) enum SchemaCommand {
    /// Register every .avsc file of a folder. Types other files use are
    /// registered first, under their full name, and referenced; the rest
    /// under the chosen strategy. `Name.v1.avsc` registers before `Name.avsc`.
    #[command(after_help = "Examples:\n  \
        keel schema register schemas/avro\n  \
        keel schema register schemas/avro --strategy topic-record-name --topic orders")]
    Register(RegisterArgs),
    /// Exit non-zero when a local schema is incompatible with what the
    /// registry holds under the subject's compatibility level — the step CI
    /// runs before deploying a producer.
    #[command(
        after_help = "Example:\n  keel schema check schemas/avro/shop.orders.OrderPlaced.avsc"
    )]
    Check(CheckArgs),
    /// Print a registered schema, by subject and version or by id.
    #[command(
        after_help = "Examples:\n  keel schema get --subject orders-value\n  keel schema get --id 3"
    )]
    Get(GetArgs),
    /// List subjects with their versions and latest ids.
    #[command(after_help = "Example:\n  keel schema list")]
    List,
    /// Show what changed: between two versions of a subject, or between a
    /// local file and the subject's latest version.
    #[command(after_help = "Examples:\n  \
        keel schema diff --subject shop.orders.OrderPlaced --from 1 --to 2\n  \
        keel schema diff --subject shop.orders.OrderPlaced schemas/avro/shop.orders.OrderPlaced.avsc")]
    Diff(DiffArgs),
}

#[derive(Debug, Args)]
pub(crate) struct StrategyArgs {
    /// Subject naming: topic-name, record-name or topic-record-name.
    #[arg(long, default_value = "record-name")]
    strategy: SubjectNameStrategy,
    /// Topic, for the topic-name and topic-record-name strategies.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    topic: Option<String>,
}

impl StrategyArgs {
    fn subject(&self, full_name: &str) -> anyhow::Result<String> {
        match (&self.strategy, &self.topic) {
            (SubjectNameStrategy::RecordName, _) => Ok(full_name.to_owned()),
            (strategy, Some(topic)) => Ok(strategy.subject(topic, full_name)),
            (strategy, None) => bail!("--strategy {strategy} needs --topic"),
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct RegisterArgs {
    /// Folder of .avsc files.
    dir: PathBuf,
    #[command(flatten)]
    strategy: StrategyArgs,
    /// Store the normalized form (docs dropped) instead of the file's text.
    #[arg(long)]
    normalize: bool,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The .avsc file to check; types it uses are looked up in the other
    /// .avsc files of its folder.
    file: PathBuf,
    /// Subject to check against (default: from the strategy).
    #[arg(long)]
    subject: Option<String>,
    #[command(flatten)]
    strategy: StrategyArgs,
}

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// Subject.
    #[arg(long, required_unless_present = "id")]
    subject: Option<String>,
    /// Version number or `latest`.
    #[arg(long, default_value = "latest")]
    version: String,
    /// Global schema id (instead of subject and version).
    #[arg(long, conflicts_with = "subject")]
    id: Option<u32>,
}

#[derive(Debug, Args)]
pub(crate) struct DiffArgs {
    /// Subject.
    #[arg(long)]
    subject: String,
    /// A local .avsc file to compare with `--from` (default: latest).
    file: Option<PathBuf>,
    /// The old version.
    #[arg(long, default_value = "latest")]
    from: String,
    /// The new version (when no file is given).
    #[arg(long, conflicts_with = "file")]
    to: Option<String>,
}

pub(crate) async fn run(client: &RegistryClient, command: SchemaCommand) -> anyhow::Result<()> {
    match command {
        SchemaCommand::Register(args) => register(client, args).await,
        SchemaCommand::Check(args) => check(client, args).await,
        SchemaCommand::Get(args) => get(client, args).await,
        SchemaCommand::List => list(client).await,
        SchemaCommand::Diff(args) => diff_command(client, args).await,
    }
}

/// One .avsc file.
struct LocalSchema {
    path: PathBuf,
    text: String,
    doc: Value,
    full_name: String,
    /// `Name.v1.avsc` → 1; unversioned files sort last (newest).
    version_hint: u32,
    defines: References,
}

fn load_dir(dir: &Path) -> anyhow::Result<Vec<LocalSchema>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("avsc") {
            out.push(load_file(&path)?);
        }
    }
    if out.is_empty() {
        bail!("no .avsc files in {}", dir.display());
    }
    out.sort_by(|a, b| (&a.full_name, a.version_hint).cmp(&(&b.full_name, b.version_hint)));
    Ok(out)
}

/// Refuses two files of one type and version in `all` (sorted by
/// [`load_dir`]) for `register`: which registers last, and so becomes the
/// latest, would be the folder's listing order, a guess. (A check or diff
/// of one file reads its folder too, where a copy being edited beside its
/// original is fine.)
fn refuse_ambiguous_versions(all: &[LocalSchema], dir: &Path) -> anyhow::Result<()> {
    if let Some(pair) = all
        .windows(2)
        .find(|w| (&w[0].full_name, w[0].version_hint) == (&w[1].full_name, w[1].version_hint))
    {
        let version = match pair[0].version_hint {
            u32::MAX => "no version in their names".to_owned(),
            v => format!("the same version, v{v}"),
        };
        bail!(
            "{} and {} both define {} with {version}, so their order is unknown: name the \
             versions {name}.v1.avsc, {name}.v2.avsc, … (the newest may stay {name}.avsc), \
             or keep one of them out of {}",
            file_name(&pair[0].path),
            file_name(&pair[1].path),
            pair[0].full_name,
            dir.display(),
            name = pair[0].full_name,
        );
    }
    Ok(())
}

fn load_file(path: &Path) -> anyhow::Result<LocalSchema> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let defines =
        named_types(&doc).with_context(|| format!("{} is not an Avro schema", path.display()))?;
    let name = doc["name"].as_str().unwrap_or_default();
    let full_name = match doc["namespace"].as_str() {
        Some(ns) if !name.contains('.') => format!("{ns}.{name}"),
        _ => name.to_owned(),
    };
    if full_name.is_empty() {
        bail!(
            "{}: the top-level schema must be a named type (record, enum or fixed)",
            path.display()
        );
    }
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let version_hint = stem
        .rsplit_once(".v")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(u32::MAX);
    Ok(LocalSchema {
        path: path.to_owned(),
        text,
        doc,
        full_name,
        version_hint,
        defines,
    })
}

/// For `schema`: the types it takes from other files, as (type name,
/// defining file's full name).
fn dependencies(
    schema: &LocalSchema,
    all: &[LocalSchema],
) -> anyhow::Result<Vec<(String, String)>> {
    let mut available = References::new();
    let mut definer: HashMap<String, String> = HashMap::new();
    // The newest file of each other full name provides its types.
    for other in all.iter().filter(|o| o.full_name != schema.full_name) {
        for (name, def) in &other.defines {
            available.insert(name.clone(), def.clone());
            definer.insert(name.clone(), other.full_name.clone());
        }
    }
    let (_, used) = resolve_with_usage(&schema.doc, &available)
        .with_context(|| format!("{} is not a valid Avro schema", schema.path.display()))?;
    Ok(used
        .into_iter()
        .filter_map(|name| definer.get(&name).map(|d| (name, d.clone())))
        .collect())
}

async fn register(client: &RegistryClient, args: RegisterArgs) -> anyhow::Result<()> {
    let all = load_dir(&args.dir)?;
    refuse_ambiguous_versions(&all, &args.dir)?;
    let deps: Vec<Vec<(String, String)>> = all
        .iter()
        .map(|s| dependencies(s, &all))
        .collect::<anyhow::Result<_>>()?;
    let depended_on: Vec<&str> = deps.iter().flatten().map(|(_, d)| d.as_str()).collect();
    // One subject holds one record's versions: two records sent to one
    // subject (several records under topic-name) would fail half-way, the
    // subject left holding whichever came first. Refused before any.
    let mut subjects: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for schema in all
        .iter()
        .filter(|s| !depended_on.contains(&s.full_name.as_str()))
    {
        subjects
            .entry(args.strategy.subject(&schema.full_name)?)
            .or_default()
            .insert(&schema.full_name);
    }
    if let Some((subject, records)) = subjects.iter().find(|(_, records)| records.len() > 1) {
        bail!(
            "nothing registered: {} records of {} would go under the one subject `{subject}` ({}); \
             a subject holds one record's versions: register a folder holding one of them \
             (and the types it uses), or use --strategy topic-record-name or record-name",
            records.len(),
            args.dir.display(),
            records.iter().copied().collect::<Vec<_>>().join(", ")
        );
    }
    // Kahn's order over full names; files of one name keep version order.
    let mut registered: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut remaining: Vec<usize> = (0..all.len()).collect();
    while !remaining.is_empty() {
        let ready = remaining.iter().position(|&i| {
            deps[i].iter().all(|(_, d)| registered.contains_key(d))
                && !remaining.iter().any(|&j| {
                    j != i
                        && all[j].full_name == all[i].full_name
                        && all[j].version_hint < all[i].version_hint
                })
        });
        let Some(pos) = ready else {
            let stuck: Vec<String> = remaining
                .iter()
                .map(|&i| all[i].path.display().to_string())
                .collect();
            bail!(
                "these schemas reference each other in a cycle: {}",
                stuck.join(", ")
            );
        };
        let i = remaining.remove(pos);
        let schema = &all[i];
        let subject = if depended_on.contains(&schema.full_name.as_str()) {
            schema.full_name.clone()
        } else {
            args.strategy.subject(&schema.full_name)?
        };
        let references: Vec<SchemaReference> = deps[i]
            .iter()
            .map(|(name, definer)| {
                let (subject, version) = registered[definer].clone();
                SchemaReference {
                    name: name.clone(),
                    subject,
                    version,
                }
            })
            .collect();
        let id = client
            .register_schema(&subject, &schema.text, &references, args.normalize)
            .await
            .with_context(|| {
                format!(
                    "cannot register {} under `{subject}`",
                    schema.path.display()
                )
            })?;
        let version = client
            .lookup_schema(&subject, &schema.text, &references, args.normalize)
            .await?
            .map(|v| v.version)
            .context("registered schema not found by lookup")?;
        say!(
            "{:<48} {subject} version {version} (id {id}){}",
            file_name(&schema.path),
            if references.is_empty() {
                String::new()
            } else {
                format!(
                    ", references {}",
                    references
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        registered.insert(schema.full_name.clone(), (subject, version));
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

/// A local file with the references it needs, resolved against its folder.
fn local_with_references(
    file: &Path,
) -> anyhow::Result<(LocalSchema, Vec<SchemaReference>, Value)> {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let schema = load_file(file)?;
    let siblings = load_dir(dir).with_context(|| {
        format!(
            "{} may use types the other .avsc files in {} define, so they are read with it",
            file.display(),
            dir.display()
        )
    })?;
    let deps = dependencies(&schema, &siblings)?;
    let references: Vec<SchemaReference> = deps
        .iter()
        .map(|(name, definer)| SchemaReference {
            name: name.clone(),
            subject: definer.clone(),
            version: -1,
        })
        .collect();
    let mut available = References::new();
    for other in siblings.iter().filter(|o| o.full_name != schema.full_name) {
        available.extend(other.defines.clone());
    }
    let normal = resolve(&schema.doc, &available)?;
    Ok((schema, references, normal))
}

async fn check(client: &RegistryClient, args: CheckArgs) -> anyhow::Result<()> {
    let (schema, mut references, _) = local_with_references(&args.file)?;
    let subject = match args.subject {
        Some(s) => s,
        None => args.strategy.subject(&schema.full_name)?,
    };
    // Confluent resolves `version: -1` as latest on lookup but not on every
    // registry: pin the references to the current latest versions.
    for r in &mut references {
        r.version = client
            .version(&r.subject, "latest")
            .await
            .with_context(|| {
                format!(
                    "{} uses {}, which is not registered under `{}`",
                    file_name(&schema.path),
                    r.name,
                    r.subject
                )
            })?
            .version;
    }
    let level = client.compatibility_level(Some(&subject)).await?;
    let answer = match client
        .check_compatibility(&subject, "latest", &schema.text, &references)
        .await
    {
        Ok(answer) => answer,
        Err(keel_schemas::SchemaError::Registry { code: 40401, .. }) => {
            say!(
                "{}: subject `{subject}` has no versions yet: nothing to be incompatible with",
                file_name(&schema.path)
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    if answer.is_compatible {
        say!(
            "{}: compatible with `{subject}` under {level}",
            file_name(&schema.path)
        );
        Ok(())
    } else {
        for m in &answer.messages {
            say!("  {m}");
        }
        bail!(
            "{} is incompatible with `{subject}` under {level}; registering it would break consumers",
            file_name(&schema.path)
        )
    }
}

async fn get(client: &RegistryClient, args: GetArgs) -> anyhow::Result<()> {
    let out = match (args.id, &args.subject) {
        (Some(id), _) => {
            let info = client.schema(id).await?;
            json!({"id": id, "schema": parse_or_text(&info.schema), "references": info.references})
        }
        (None, Some(subject)) => {
            let v = client.version(subject, &args.version).await?;
            json!({"subject": v.subject, "version": v.version, "id": v.id,
                   "schema": parse_or_text(&v.schema), "references": v.references})
        }
        (None, None) => bail!("give --subject or --id"),
    };
    say!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn parse_or_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

async fn list(client: &RegistryClient) -> anyhow::Result<()> {
    let subjects = client.subjects().await?;
    if subjects.is_empty() {
        say!("no subjects");
    }
    for subject in subjects {
        let versions = client.versions(&subject).await?;
        let latest = client.version(&subject, "latest").await?;
        let versions: Vec<String> = versions.iter().map(i64::to_string).collect();
        say!(
            "{subject:<48} versions {:<12} latest id {}",
            versions.join(","),
            latest.id
        );
    }
    Ok(())
}

async fn normal_version(
    client: &RegistryClient,
    subject: &str,
    version: &str,
) -> anyhow::Result<Value> {
    let v = client.version(subject, version).await?;
    Ok(serde_json::from_str(&client.resolved(v.id).await?)?)
}

async fn diff_command(client: &RegistryClient, args: DiffArgs) -> anyhow::Result<()> {
    let old = normal_version(client, &args.subject, &args.from).await?;
    let (new, label) = match (&args.file, &args.to) {
        (Some(file), _) => (local_with_references(file)?.2, file_name(file)),
        (None, Some(to)) => (
            normal_version(client, &args.subject, to).await?,
            format!("version {to}"),
        ),
        (None, None) => bail!("give a file or --to VERSION to compare with"),
    };
    let changes = diff(&old, &new);
    if changes.is_empty() {
        say!(
            "{} version {} and {label}: no differences",
            args.subject,
            args.from
        );
    } else {
        say!("{} version {} → {label}:", args.subject, args.from);
        for c in changes {
            say!("  {c}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{load_dir, local_with_references, refuse_ambiguous_versions};

    /// Two files of one type and version are refused by a registration,
    /// naming both: which would register last (the latest) would be a
    /// guess.
    #[test]
    fn two_files_of_one_type_and_version_are_refused() {
        use std::hash::{BuildHasher, RandomState};
        let unique = RandomState::new().hash_one(std::process::id());
        let dir = std::env::temp_dir().join(format!("keel-schema-dup-{unique:016x}"));
        std::fs::create_dir_all(&dir).unwrap();
        let schema = |fields: &str| {
            format!(
                r#"{{"type": "record", "name": "Dup", "namespace": "t", "fields": [{fields}]}}"#
            )
        };
        let a = r#"{"name": "a", "type": "int"}"#;
        let b = r#"{"name": "b", "type": "int"}"#;
        std::fs::write(dir.join("t.Dup.avsc"), schema(&format!("{a}, {b}"))).unwrap();
        std::fs::write(dir.join("t.Dup.old.avsc"), schema(a)).unwrap();
        let check = |dir: &std::path::Path| {
            load_dir(dir)
                .and_then(|all| refuse_ambiguous_versions(&all, dir).map(|()| all.len()))
                .map_err(|e| format!("{e:#}"))
        };
        let unversioned = check(&dir);
        // A copy beside its original is fine for a check of one file.
        let one = local_with_references(&dir.join("t.Dup.avsc")).map(|_| ());
        // Versioned, they are in order.
        std::fs::rename(dir.join("t.Dup.old.avsc"), dir.join("t.Dup.v1.avsc")).unwrap();
        let versioned = check(&dir);
        std::fs::write(dir.join("t.Dup.again.v1.avsc"), schema(a)).unwrap();
        let same_version = check(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let e = unversioned.unwrap_err();
        assert!(
            e.contains("t.Dup.avsc") && e.contains("t.Dup.old.avsc"),
            "{e}"
        );
        assert!(e.contains("no version in their names"), "{e}");
        one.expect("a check of one file is not refused");
        assert_eq!(versioned.unwrap(), 2);
        let e = same_version.unwrap_err();
        assert!(e.contains("the same version, v1"), "{e}");
    }

    /// A broken file beside the one checked fails the check, and the
    /// error says why that file was read at all.
    #[test]
    fn a_broken_sibling_is_named_with_why_it_was_read() {
        use std::hash::{BuildHasher, RandomState};
        let unique = RandomState::new().hash_one(std::process::id());
        let dir = std::env::temp_dir().join(format!("keel-schema-{unique:016x}"));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("Good.avsc");
        std::fs::write(
            &good,
            r#"{"type": "record", "name": "Good", "fields": [{"name": "a", "type": "int"}]}"#,
        )
        .unwrap();
        std::fs::write(dir.join("Broken.avsc"), "{ not json").unwrap();
        let outcome = local_with_references(&good);
        let _ = std::fs::remove_dir_all(&dir);
        let Err(e) = outcome else {
            panic!("a folder with a broken file was read as if whole")
        };
        let e = format!("{e:#}");
        assert!(e.contains("Broken.avsc is not JSON"), "{e}");
        assert!(e.contains("may use types the other .avsc files"), "{e}");
    }
}
