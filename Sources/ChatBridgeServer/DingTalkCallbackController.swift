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
    let maxBodyBytes: Int
    let logger: Logger
    private let ackTimer: Metrics.Timer

    init(ingress: DingTalkIngress, maxBodyBytes: Int, metrics: any MetricsFactory, logger: Logger) {
        self.ingress = ingress
        self.maxBodyBytes = maxBodyBytes
        self.logger = logger
        ackTimer = Metrics.Timer(label: "chatbridge_ack_seconds", dimensions: [("platform", "dingtalk")], factory: metrics)
    }

    func addRoutes(to router: Router<BasicRequestContext>) {
        router.post("/callbacks/dingtalk") { request, context in
            try await self.handle(request, context: context)
        }
    }

    func handle(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let started = ContinuousClock.now
        do {
            try ingress.authenticate(timestamp: request.headers[.init("timestamp")!], sign: request.headers[.init("sign")!])
            let buffer: ByteBuffer
            do {
                buffer = try await request.body.collect(upTo: maxBodyBytes)
            } catch is NIOTooManyBytesError {
                ingress.noteRejected("body larger than server.max_body_bytes")
                return .json(.contentTooLarge, ["error": "body larger than server.max_body_bytes (\(maxBodyBytes) bytes)"])
            }
            _ = try await ingress.receive(Data(buffer: buffer))
        } catch let rejection as IngressRejection {
            switch rejection.kind {
            case .unauthorized: return .json(.unauthorized, ["error": rejection.reason])
            case .badRequest: return .json(.badRequest, ["error": rejection.reason])
            case .notConfigured, .unavailable: return .json(.serviceUnavailable, ["error": rejection.reason])
            }
        } catch {
            // Not stored, so not acknowledged: DingTalk delivers it again.
            logger.error("could not store a DingTalk message; answering 503", metadata: ["error": "\(error)"])
            return .json(.serviceUnavailable, ["error": "the message could not be stored; deliver it again later"])
        }
        ackTimer.recordNanoseconds((ContinuousClock.now - started).nanoseconds)
        return Response(
            status: .ok, headers: [.contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(string: #"{"msgtype":"empty"}"#)))
    }
}

extension Response {
    static func json(_ status: HTTPResponse.Status, _ object: [String: String]) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(data: data)))
    }
}
