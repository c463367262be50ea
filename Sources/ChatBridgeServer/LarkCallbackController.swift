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
    let maxBodyBytes: Int
    let logger: Logger
    private let ackTimer: Metrics.Timer

    init(ingress: LarkWebhookIngress, maxBodyBytes: Int, metrics: any MetricsFactory, logger: Logger) {
        self.ingress = ingress
        self.maxBodyBytes = maxBodyBytes
        self.logger = logger
        ackTimer = Metrics.Timer(label: "chatbridge_ack_seconds", dimensions: [("platform", "lark")], factory: metrics)
    }

    func addRoutes(to router: Router<BasicRequestContext>) {
        router.post("/callbacks/lark") { request, context in
            try await self.handle(request, context: context)
        }
    }

    func handle(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let started = ContinuousClock.now
        let outcome: LarkWebhookOutcome
        do {
            let buffer: ByteBuffer
            do {
                buffer = try await request.body.collect(upTo: maxBodyBytes)
            } catch is NIOTooManyBytesError {
                ingress.noteRejected("body larger than server.max_body_bytes")
                return .json(.contentTooLarge, ["error": "body larger than server.max_body_bytes (\(maxBodyBytes) bytes)"])
            }
            outcome = try await ingress.receive(
                body: Data(buffer: buffer), timestamp: request.headers[.init("X-Lark-Request-Timestamp")!],
                nonce: request.headers[.init("X-Lark-Request-Nonce")!], signature: request.headers[.init("X-Lark-Signature")!])
        } catch let rejection as IngressRejection {
            switch rejection.kind {
            case .unauthorized: return .json(.unauthorized, ["error": rejection.reason])
            case .badRequest: return .json(.badRequest, ["error": rejection.reason])
            case .notConfigured, .unavailable: return .json(.serviceUnavailable, ["error": rejection.reason])
            }
        } catch {
            // Not stored, so not acknowledged: Feishu pushes it again.
            logger.error("could not store a Lark message; answering 503", metadata: ["error": "\(error)"])
            return .json(.serviceUnavailable, ["error": "the message could not be stored; deliver it again later"])
        }
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
