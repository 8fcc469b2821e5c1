//! The few Docker Engine API calls `stackctl build` needs, through bollard,
//! with errors that say how to fix the machine.

use crate::BuildError;
use bollard::Docker;
use bollard::query_parameters::{BuildImageOptionsBuilder, BuilderVersion, RemoveImageOptions};
use futures_util::StreamExt as _;

/// Connects to the local engine (`DOCKER_HOST` or the unix socket) and
/// negotiates the API version down to the engine's (1.41 on Debian 12's
/// 20.10). Fails with instructions when no engine answers.
pub async fn connect() -> Result<Docker, BuildError> {
    let where_ =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    let unreachable = |detail: String| BuildError::EngineUnreachable {
        host: where_.clone(),
        detail,
    };
    let docker = Docker::connect_with_local_defaults().map_err(|e| unreachable(e.to_string()))?;
    docker
        .negotiate_version()
        .await
        .map_err(|e| unreachable(e.to_string()))
}

/// The size in bytes of local image `name`, or None when it is not here.
/// Never pulls.
pub async fn local_image_size(docker: &Docker, name: &str) -> Result<Option<u64>, BuildError> {
    match docker.inspect_image(name).await {
        Ok(image) => Ok(Some(
            image
                .size
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or_default(),
        )),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(source) => Err(BuildError::Docker {
            op: "inspect image",
            source,
        }),
    }
}

/// The id of local image `name`, or None when it is not here.
async fn local_image_id(docker: &Docker, name: &str) -> Option<String> {
    docker.inspect_image(name).await.ok().and_then(|i| i.id)
}

/// Builds `tag` from an in-memory tar build context with the classic
/// builder (no BuildKit session, no buildx). The context's Dockerfile must
/// start `FROM scratch`, so nothing is pulled. The image `tag` named before
/// is removed when nothing else uses it, so rebuilds (every test run) do
/// not pile up untagged images.
pub async fn build_image(docker: &Docker, tag: &str, context: Vec<u8>) -> Result<(), BuildError> {
    let previous = local_image_id(docker, tag).await;
    build(docker, tag, context).await?;
    if let Some(old) = previous
        && local_image_id(docker, tag).await.as_ref() != Some(&old)
    {
        // Refused (and ignored) while a container or another tag uses it.
        let _ = docker
            .remove_image(&old, None::<RemoveImageOptions>, None)
            .await;
    }
    Ok(())
}

async fn build(docker: &Docker, tag: &str, context: Vec<u8>) -> Result<(), BuildError> {
    let opts = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(tag)
        .rm(true)
        .forcerm(true)
        .version(BuilderVersion::BuilderV1)
        .build();
    let mut stream = docker.build_image(opts, None, Some(bollard::body_full(context.into())));
    let mut output = String::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(s) = info.stream {
                    output.push_str(&s);
                }
                if let Some(detail) = info.error_detail {
                    return Err(BuildError::Build {
                        tag: tag.to_owned(),
                        detail: format!(
                            "{}\n{}",
                            output.trim_end(),
                            detail.message.unwrap_or_default()
                        ),
                    });
                }
            }
            Err(e) => {
                return Err(BuildError::Build {
                    tag: tag.to_owned(),
                    detail: format!("{}\n{e}", output.trim_end()),
                });
            }
        }
    }
    Ok(())
}
