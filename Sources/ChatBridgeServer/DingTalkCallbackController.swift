import ChatBridgeCore
import ChatBridgeDingTalk
import Foundation
import Hummingbird
import Logging
import Metrics
import NIOCore
import NIOFoundationCompat

/// `POST /callbacks/dingtalk`: the HTTP adapter of ``DingTalkIngress``. It verifies the signature headers
/// before reading the body, caps the body, and answers 200 `{"msgtype":"empty"}` only after the message
/// is committed to the inbox; it never waits for the model.
struct DingTalkCallbackController: Sendable {
    let ingress: DingTalkIngress
    let route: CallbackRoute
    private let ackTimer: Metrics.Timer

    init(ingress: DingTalkIngress, maxBodyBytes: Int, metrics: any MetricsFactory, logger: Logger) {
        self.ingress = ingress
        route = CallbackRoute(platform: "DingTalk", maxBodyBytes: maxBodyBytes, logger: logger, noteTooLarge: { [ingress] in ingress.noteRejected($0) })
        ackTimer = Metrics.Timer(label: "chatbridge_ack_seconds", dimensions: [("platform", "dingtalk")], factory: metrics)
    }

    func addRoutes(to router: Router<BasicRequestContext>) {
        router.post("/callbacks/dingtalk") { request, context in
            await self.handle(request, context: context)
        }
    }

    func handle(_ request: Request, context: BasicRequestContext) async -> Response {
        let started = ContinuousClock.now
        return await route.answer {
            try ingress.authenticate(timestamp: request.headers[.init("timestamp")!], sign: request.headers[.init("sign")!])
            _ = try await ingress.receive(try await route.body(of: request))
            ackTimer.recordNanoseconds((ContinuousClock.now - started).nanoseconds)
            return Response(
                status: .ok, headers: [.contentType: "application/json"],
                body: .init(byteBuffer: ByteBuffer(string: #"{"msgtype":"empty"}"#)))
        }
    }
}
