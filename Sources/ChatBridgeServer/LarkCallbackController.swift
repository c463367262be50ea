import ChatBridgeCore
import ChatBridgeLark
import Foundation
import Hummingbird
import Logging
import Metrics
import NIOCore
import NIOFoundationCompat

/// `POST /callbacks/lark`: the HTTP adapter of ``LarkWebhookIngress`` (protocols E.1). It caps the body,
/// hands the raw bytes and the signature headers to the ingress and answers 200 only after a message
/// event is committed to the inbox (`{"challenge": …}` for URL verification); it never waits for the model.
struct LarkCallbackController: Sendable {
    let ingress: LarkWebhookIngress
    let route: CallbackRoute
    private let ackTimer: Metrics.Timer

    init(ingress: LarkWebhookIngress, maxBodyBytes: Int, metrics: any MetricsFactory, logger: Logger) {
        self.ingress = ingress
        route = CallbackRoute(platform: "Lark", maxBodyBytes: maxBodyBytes, logger: logger, noteTooLarge: { [ingress] in ingress.noteRejected($0) })
        ackTimer = Metrics.Timer(label: "chatbridge_ack_seconds", dimensions: [("platform", "lark")], factory: metrics)
    }

    func addRoutes(to router: Router<BasicRequestContext>) {
        router.post("/callbacks/lark") { request, context in
            await self.handle(request, context: context)
        }
    }

    func handle(_ request: Request, context: BasicRequestContext) async -> Response {
        let started = ContinuousClock.now
        return await route.answer {
            let outcome = try await ingress.receive(
                body: try await route.body(of: request), timestamp: request.headers[.init("X-Lark-Request-Timestamp")!],
                nonce: request.headers[.init("X-Lark-Request-Nonce")!], signature: request.headers[.init("X-Lark-Signature")!])
            switch outcome {
            case .challenge(let challenge):
                return .json(.ok, ["challenge": challenge])
            case .stored:
                ackTimer.recordNanoseconds((ContinuousClock.now - started).nanoseconds)
                return .json(.ok, ["msg": "success"])
            case .ignored:
                return .json(.ok, ["msg": "success"])
            }
        }
    }
}
