//! The node's local embedding model (`start --embed-model DIR`) that
//! gives vectors to search capabilities made without a provider
//! ([`crate::search`]): a static
//! Model2Vec-style model (a token → vector table; a text's vector is the
//! weighted mean of its tokens' vectors, normalized) read from a folder
//! holding `tokenizer.json`, `model.safetensors` and `config.json`.
//!
//! No model ships inside the binary and nothing is downloaded at run time:
//! the model comes from a package. The one the tests use is PyPI's
//! `tokenlearn-static-model` (10,000 × 64 int8 vectors, 4 MB of weights and
//! a 10 MB tokenizer, baked into the wheel): `pip install
//! tokenlearn-static-model` and give its package folder (`static_model`,
//! whose `model/` holds the files) or the `model/` folder itself. Any
//! Model2Vec folder works the same (float32, float16 or int8 vectors, with
//! or without vocabulary quantization).
//!
//! The model is read once, on first use or by [`LocalModel::warm`] at the
//! node's start, off the async threads; embedding runs on tokio's blocking
//! pool. A model that cannot be read, or that panics while embedding, is
//! a search failure: the answer is full text with the reason in its
//! notes, as for a failing provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use model2vec_rs::model::StaticModel;

use crate::error::Error;

/// Longest vector a model may give.
pub const MAX_DIM: usize = 8192;

/// Files of a model folder, and the most bytes each may have.
const FILES: [(&str, u64); 3] = [
    ("tokenizer.json", 256 << 20),
    ("model.safetensors", 1 << 30),
    ("config.json", 1 << 20),
];
/// Most tokens of one text that count (the rest of a long text is cut).
const MAX_TOKENS: usize = 512;
/// Texts embedded per blocking call.
const BATCH: usize = 256;

/// A local embedding model (see the module docs).
pub struct LocalModel {
    dir: PathBuf,
    /// The model and its dimensions, once read (or why it cannot be).
    loaded: tokio::sync::OnceCell<Result<(Arc<StaticModel>, usize), String>>,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel")
            .field("dir", &self.dir)
            .finish()
    }
}

impl LocalModel {
    /// The model in `dir`: a Model2Vec folder, or a package folder whose
    /// `model/` is one. Checks that the files are there and not over their
    /// bounds; reads nothing yet.
    pub fn open(dir: &Path) -> Result<LocalModel, Error> {
        let model_dir = if dir.join(FILES[0].0).is_file() {
            dir.to_path_buf()
        } else if dir.join("model").join(FILES[0].0).is_file() {
            dir.join("model")
        } else {
            return Err(Error::Invalid(format!(
                "{} holds no embedding model (no tokenizer.json in it or in its model/): give the folder of a Model2Vec model, e.g. the static_model folder that `pip install tokenlearn-static-model` installs",
                dir.display()
            )));
        };
        for (name, max) in FILES {
            let p = model_dir.join(name);
            let len = std::fs::metadata(&p)
                .map_err(|e| {
                    Error::Invalid(format!(
                        "the embedding model in {} lacks {name}: {e}",
                        model_dir.display()
                    ))
                })?
                .len();
            if len > max {
                return Err(Error::Invalid(format!(
                    "{} is {len} bytes, over the {max} an embedding model's {name} may have",
                    p.display()
                )));
            }
        }
        let dir = model_dir.canonicalize().unwrap_or(model_dir);
        Ok(LocalModel {
            dir,
            loaded: tokio::sync::OnceCell::new(),
        })
    }

    /// The model's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// For answers and logs: the folder, and the dimensions once read.
    pub fn describe(&self) -> String {
        match self.loaded.get() {
            Some(Ok((_, dims))) => format!("{} ({dims} dimensions)", self.dir.display()),
            _ => self.dir.display().to_string(),
        }
    }

    /// Reads the model now (the node does this at its start, so that the
    /// first search does not wait for it): the time it took, or why it
    /// cannot be used.
    pub async fn warm(&self) -> Result<std::time::Duration, String> {
        let t0 = std::time::Instant::now();
        self.model().await.map(|_| t0.elapsed())
    }

    async fn model(&self) -> Result<Arc<StaticModel>, String> {
        self.loaded
            .get_or_init(|| async {
                let dir = self.dir.clone();
                match tokio::task::spawn_blocking(move || load(&dir)).await {
                    Ok(r) => r,
                    Err(e) => Err(format!("reading the model panicked: {e}")),
                }
            })
            .await
            .clone()
            .map(|(m, _)| m)
            .map_err(|e| format!("local embedding model {}: {e}", self.dir.display()))
    }

    /// One vector per text, in order.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
        let m = self.model().await?;
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(BATCH) {
            let m = m.clone();
            let chunk = chunk.to_vec();
            let vs = tokio::task::spawn_blocking(move || {
                m.encode_with_args(&chunk, Some(MAX_TOKENS), BATCH)
            })
            .await
            .map_err(|e| {
                format!(
                    "local embedding model {}: embedding panicked: {e}",
                    self.dir.display()
                )
            })?;
            out.extend(vs);
        }
        if out.len() != texts.len() {
            return Err(format!(
                "local embedding model {}: asked for {} embeddings, got {}",
                self.dir.display(),
                texts.len(),
                out.len()
            ));
        }
        Ok(out)
    }
}

/// Reads and checks the model: it must embed a word into 1 to
/// [`MAX_DIM`] finite numbers; how many is its dimensions.
fn load(dir: &Path) -> Result<(Arc<StaticModel>, usize), String> {
    let m = StaticModel::from_pretrained(dir, None, None, None).map_err(|e| format!("{e:#}"))?;
    let probe =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.encode_single("capstan")))
            .map_err(|_| {
                "the model panicked embedding a word: its files do not match".to_string()
            })?;
    if probe.is_empty() || probe.len() > MAX_DIM || probe.iter().any(|x| !x.is_finite()) {
        return Err(format!(
            "the model gives {} numbers for a word; expected 1 to {MAX_DIM} finite ones",
            probe.len()
        ));
    }
    Ok((Arc::new(m), probe.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_without_a_model_is_refused_with_what_to_give() {
        let d = tempfile::tempdir().unwrap();
        let e = LocalModel::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("no tokenizer.json"), "{e}");
        assert!(e.contains("tokenlearn-static-model"), "{e}");
        std::fs::write(d.path().join("tokenizer.json"), b"{}").unwrap();
        let e = LocalModel::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("lacks model.safetensors"), "{e}");
    }

    #[tokio::test]
    async fn damaged_files_fail_the_embedding_not_the_node() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("tokenizer.json"),
            b"{\"not\": \"a tokenizer\"}",
        )
        .unwrap();
        std::fs::write(
            d.path().join("model.safetensors"),
            b"\x08\0\0\0\0\0\0\0{}      ",
        )
        .unwrap();
        std::fs::write(d.path().join("config.json"), b"{}").unwrap();
        let m = LocalModel::open(d.path()).unwrap();
        let e = m.embed(vec!["hello".into()]).await.unwrap_err();
        assert!(e.starts_with("local embedding model"), "{e}");
        // Asked again: the same answer, the files are not read again.
        assert_eq!(m.embed(vec!["hello".into()]).await.unwrap_err(), e);
    }

    /// With the packaged model (`CAPSTAN_EMBED_MODEL`, set by
    /// `scripts/test`): texts about the same thing are nearer than texts
    /// about different things, and vectors are unit length.
    #[tokio::test]
    async fn the_packaged_model_puts_paraphrases_near() {
        let Some(dir) = std::env::var_os("CAPSTAN_EMBED_MODEL") else {
            if std::env::var_os("CAPSTAN_REQUIRE_EMBED_MODEL").is_some() {
                panic!("CAPSTAN_REQUIRE_EMBED_MODEL is set but CAPSTAN_EMBED_MODEL is not");
            }
            eprintln!("skipped: CAPSTAN_EMBED_MODEL is not set (scripts/embed-model)");
            return;
        };
        let m = LocalModel::open(Path::new(&dir)).unwrap();
        m.warm().await.unwrap();
        let v = m
            .embed(vec![
                "quarterly revenue grew in the northern region".into(),
                "sales increased in the north this quarter".into(),
                "the recipe needs two eggs and flour".into(),
                String::new(),
            ])
            .await
            .unwrap();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        for x in &v[..3] {
            assert!((dot(x, x) - 1.0).abs() < 1e-3, "not unit length");
        }
        assert!(
            dot(&v[0], &v[1]) > dot(&v[0], &v[2]) + 0.1,
            "paraphrase {} vs unrelated {}",
            dot(&v[0], &v[1]),
            dot(&v[0], &v[2])
        );
        assert_eq!(v[3].len(), v[0].len());
        assert!(m.describe().contains("64 dimensions"), "{}", m.describe());
    }
}
