//! The HTTP API. All routing is in `handle`, one match over the path, so that every answer (including 404 and
//! 405) is JSON with a code and every request is counted under a bounded `route` label.

use std::sync::Arc;

use bytes::Bytes;
use kvab_contract::report::REPORTS_PATH;
use kvab_contract::ENDPOINTS_PATH;
use warp::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use warp::Filter;

use crate::answer::{error, if_none_match, json, with_status};
use crate::filter_wasm::FilterWasm;
use crate::reports::Reports;
use crate::state::State;

/// Everything the HTTP layer answers from, passed in rather than global: a test builds exactly the app it
/// needs, and two apps in one process cannot see each other's module or counts.
pub struct App {
    pub state: Arc<State>,
    pub reports: Arc<Reports>,
    /// The module of `GET /v1/filter.wasm`, when the `filter_wasm` key is set.
    pub filter_module: Option<FilterWasm>,
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The API listener's routes (`listen`).
pub fn routes(app: Arc<App>) -> crate::server::Routes {
    // The one route with a body; everything else (including other methods on it) is `handle`'s.
    let report_app = app.clone();
    let post_reports = warp::post()
        .and(warp::path!("v1" / "reports"))
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(move |headers: HeaderMap, body| {
            let app = report_app.clone();
            async move {
                let state = &app.state;
                // A header that is not visible ASCII is the client's error, named.
                let text = |name: header::HeaderName| match headers.get(&name) {
                    None => Ok(None),
                    Some(value) => value.to_str().map(Some).map_err(|_| name),
                };
                let (authorization, content_type) =
                    match (text(header::AUTHORIZATION), text(header::CONTENT_TYPE)) {
                        (Ok(a), Ok(c)) => (a, c),
                        (Err(name), _) | (_, Err(name)) => {
                            let response = error(
                                StatusCode::BAD_REQUEST,
                                "invalid_header",
                                &format!("the {name} header is not visible ASCII"),
                            );
                            count(state, "reports", &response);
                            return response;
                        }
                    };
                let answer = app
                    .reports
                    .receive(state, authorization, content_type, Box::pin(body))
                    .await;
                let response = match answer.body {
                    Ok(ack) => match serde_json::to_vec(&ack) {
                        Ok(body) => json(answer.status, Bytes::from(body)),
                        Err(_) => error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal",
                            "cannot encode the answer",
                        ),
                    },
                    Err((code, message)) => error(answer.status, code, &message),
                };
                count(state, "reports", &response);
                response
            }
        });
    let everything_else = warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .map(
            move |method: Method, path: warp::path::FullPath, headers: HeaderMap| {
                handle(&app, &method, path.as_str(), &headers)
            },
        );
    post_reports.or(everything_else).unify().boxed()
}

/// The probe listener's routes (`health_listen`): `GET /healthz` and `GET /readyz`; every other request is
/// a JSON 404 (or 405) naming what this port serves.
pub fn probe_routes(app: Arc<App>) -> crate::server::Routes {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .map(
            move |method: Method, path: warp::path::FullPath, headers: HeaderMap| match path
                .as_str()
            {
                "/healthz" | "/readyz" => handle(&app, &method, path.as_str(), &headers),
                other => {
                    let response = error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        &format!("no route for {other} on the probe port; it serves GET /healthz and GET /readyz"),
                    );
                    count(&app.state, "other", &response);
                    response
                }
            },
        )
        .boxed()
}

fn count(state: &State, route: &str, response: &Response<Bytes>) {
    state
        .metrics
        .http_requests
        .with_label_values(&[route, response.status().as_str()])
        .inc();
}

/// Answers one request. Public for handler tests that need no socket.
pub fn handle(app: &App, method: &Method, path: &str, headers: &HeaderMap) -> Response<Bytes> {
    let state = &app.state;
    let route = match path {
        ENDPOINTS_PATH => "endpoints",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        crate::filter_wasm::PATH => "filter_wasm",
        REPORTS_PATH => "reports",
        _ => "other",
    };
    let allowed = if route == "reports" {
        Method::POST
    } else {
        Method::GET
    };
    let response = if route == "other" {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route for {path}; try GET {ENDPOINTS_PATH}"),
        )
    } else if *method != allowed {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{path} accepts {allowed} only, not {method}"),
        );
        if let Ok(value) = HeaderValue::from_str(allowed.as_str()) {
            response.headers_mut().insert(header::ALLOW, value);
        }
        response
    } else {
        match route {
            "endpoints" => endpoints(state, headers),
            "healthz" => json(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}")),
            "readyz" => readyz(state),
            "filter_wasm" => crate::filter_wasm::respond(app.filter_module.as_ref(), headers),
            "metrics" => metrics(state),
            // POST /v1/reports is answered by its own filter in `routes`.
            _ => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "request not routed",
            ),
        }
    };
    count(state, route, &response);
    response
}

fn endpoints(state: &State, headers: &HeaderMap) -> Response<Bytes> {
    let Some(snapshot) = state.snapshot() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_synced",
            "the endpoint map has not completed its first full sync yet; retry shortly",
        );
    };
    let mut response = if if_none_match(headers, &snapshot.etag) {
        with_status(StatusCode::NOT_MODIFIED, Bytes::new())
    } else {
        json(StatusCode::OK, snapshot.body.clone())
    };
    if let Ok(etag) = HeaderValue::from_str(&snapshot.etag) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    // Clients may keep a copy but must revalidate (cheap: a 304).
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn readyz(state: &State) -> Response<Bytes> {
    match state.not_ready_reason() {
        None => json(
            StatusCode::OK,
            Bytes::from_static(b"{\"status\":\"ready\"}"),
        ),
        Some((code, message)) => error(StatusCode::SERVICE_UNAVAILABLE, code, message),
    }
}

fn metrics(state: &State) -> Response<Bytes> {
    match state.render_metrics() {
        Ok(text) => {
            let mut response = with_status(StatusCode::OK, Bytes::from(text));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(PROMETHEUS_TEXT),
            );
            response
        }
        Err(e) => {
            log::error!("cannot encode metrics: {e:#}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics_failed",
                "cannot encode metrics",
            )
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use kvab_contract::ErrorBody;

    use crate::answer::JSON;
    use std::time::Duration;

    use kvab_contract::EndpointMap;

    use super::*;
    use crate::index::{Index, Proxy};

    fn synced_state() -> Arc<State> {
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let mut index = Index::new(&["nvlink".to_string(), "fs".to_string()]);
        index.apply(Proxy {
            namespace: "llm-d-vllm".into(),
            name: "vllm-p2p-proxy-abc".into(),
            backend: Some("nvlink".into()),
            address: Some("10.0.0.5:8080".into()),
            ready: true,
        });
        state.publish(index.view(), jiff::Timestamp::now()).unwrap();
        state
    }

    async fn get(state: &Arc<State>, path: &str, if_none_match: Option<&str>) -> Response<Bytes> {
        let mut request = warp::test::request().method("GET").path(path);
        if let Some(tag) = if_none_match {
            request = request.header("if-none-match", tag);
        }
        request.reply(&routes(test_app(state))).await
    }

    fn test_app(state: &Arc<State>) -> Arc<App> {
        let reports = Reports::open(crate::reports::tests::settings(None), state).unwrap();
        Arc::new(App {
            state: state.clone(),
            reports: Arc::new(reports),
            filter_module: None,
        })
    }

    fn error_code(response: &Response<Bytes>) -> String {
        let body: ErrorBody = serde_json::from_slice(response.body()).unwrap();
        body.error.code
    }

    #[tokio::test]
    async fn endpoints_answer_503_with_a_reason_before_the_first_sync() {
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let response = get(&state, "/v1/endpoints", None).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], JSON);
        assert_eq!(error_code(&response), "not_synced");
        assert_eq!(
            get(&state, "/readyz", None).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get(&state, "/healthz", None).await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn endpoints_carry_an_etag_and_answer_304_when_it_matches() {
        let state = synced_state();
        let response = get(&state, "/v1/endpoints", None).await;
        assert_eq!(response.status(), StatusCode::OK);
        let etag = response.headers()[header::ETAG]
            .to_str()
            .unwrap()
            .to_string();
        let map: EndpointMap = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(etag, format!("\"{}\"", map.version));
        assert_eq!(
            map.backends["nvlink"].endpoints[0].pod,
            "llm-d-vllm/vllm-p2p-proxy-abc"
        );
        assert!(map.backends["fs"].endpoints.is_empty());

        for tag in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"other\", {etag}"),
            "*".into(),
        ] {
            let response = get(&state, "/v1/endpoints", Some(&tag)).await;
            assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{tag}");
            assert!(response.body().is_empty());
            assert_eq!(response.headers()[header::ETAG].to_str().unwrap(), etag);
        }
        let stale = get(&state, "/v1/endpoints", Some("\"0000000000000000\"")).await;
        assert_eq!(stale.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_get_json_errors() {
        let state = synced_state();
        let response = get(&state, "/v1/nope", None).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(&response), "not_found");

        let response = warp::test::request()
            .method("POST")
            .path("/v1/endpoints")
            .reply(&routes(test_app(&state)))
            .await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "GET");
        assert_eq!(error_code(&response), "method_not_allowed");
    }

    #[tokio::test]
    async fn requests_are_counted_by_route_and_code() {
        let state = synced_state();
        get(&state, "/v1/endpoints", None).await;
        get(&state, "/secret/../../etc", None).await;
        let text = String::from_utf8(get(&state, "/metrics", None).await.body().to_vec()).unwrap();
        assert!(
            text.contains("kvab_http_requests_total{code=\"200\",route=\"endpoints\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kvab_http_requests_total{code=\"404\",route=\"other\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn draining_turns_readiness_off_but_keeps_serving_the_map() {
        let state = synced_state();
        state.start_draining();
        let response = get(&state, "/readyz", None).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error_code(&response), "shutting_down");
        assert_eq!(
            get(&state, "/v1/endpoints", None).await.status(),
            StatusCode::OK
        );
    }
}
