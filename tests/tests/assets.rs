//! The browser client and the demo page are served by Herald itself, from the binary.

use herald_tests::Herald;
use reqwest::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_and_the_demo_are_served_with_their_types() {
    let herald = Herald::start().await;
    let http = herald.publisher().with_key(None);
    for (path, content_type, marker) in [
        (
            "/herald.js",
            "application/javascript",
            "export class Herald",
        ),
        (
            "/herald.d.ts",
            "application/typescript",
            "export class Herald",
        ),
        ("/", "text/html", "import { Herald } from '/herald.js'"),
        ("/demo", "text/html", "import { Herald } from '/herald.js'"),
    ] {
        let response = http.request(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let served = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(served.starts_with(content_type), "{path}: {served}");
        let body = response.text().await.unwrap();
        assert!(
            body.contains(marker),
            "{path} serves the file from clients/js"
        );
    }
    herald.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_offers_sending_only_in_insecure_mode() {
    for insecure in [false, true] {
        let herald = Herald::start_with(|s| s.auth.insecure = insecure).await;
        let http = herald.publisher().with_key(None);
        let (status, body) = http.send(http.request(Method::GET, "/demo/config")).await;
        assert_eq!(status, 200);
        assert_eq!(body["insecure"], insecure);
        herald.shutdown().await.unwrap();
    }
}
