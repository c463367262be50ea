import ChatBridgeCore
import ChatBridgeDingTalk
import Foundation
import Hummingbird
import Logging
import Metrics
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// `POST /callbacks/dingtalk`: verifies, normalises and stores a robot message, then acknowledges.
/// The acknowledgement is sent only after the message is committed, and never waits for the model.
struct DingTalkCallbackController: Sendable {
    let settings: DingTalkSettings
    let groupScope: GroupScope
    let inbox: any Inbox
    let maxBodyBytes: Int
    let lifecycle: LifecycleState
    let onAccepted: @Sendable () -> Void
    let logger: Logger

    private let received = Counter(label: "chatbridge_messages_received_total", dimensions: [("platform", "dingtalk")])
    private let duplicates = Counter(label: "chatbridge_messages_deduplicated_total", dimensions: [("platform", "dingtalk")])
    private let rejected = Counter(label: "chatbridge_callbacks_rejected_total", dimensions: [("platform", "dingtalk")])
    private let ackTimer = Metrics.Timer(label: "chatbridge_ack_seconds", dimensions: [("platform", "dingtalk")])

    func addRoutes(to router: Router<BasicRequestContext>) {
        router.post("/callbacks/dingtalk") { request, context in
            try await self.handle(request, context: context)
        }
    }

    func handle(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let started = ContinuousClock.now
        if lifecycle.isDraining {
            return .json(.serviceUnavailable, ["error": "shutting down; DingTalk will deliver this message again"])
        }
        guard !settings.clientSecret.isEmpty else {
            return .json(.serviceUnavailable, ["error": "DingTalk is not configured: set dingtalk.client_secret (CHATBRIDGE_DINGTALK_CLIENT_SECRET) to the robot's AppSecret"])
        }
        do {
            try DingTalkSignature.verify(
                timestamp: request.headers[.init("timestamp")!], sign: request.headers[.init("sign")!],
                secret: settings.clientSecret, now: Date())
        } catch {
            rejected.increment()
            logger.notice("rejected DingTalk callback", metadata: ["reason": "\(error)"])
            return .json(.unauthorized, ["error": "invalid signature: \(error)"])
        }
        let buffer: ByteBuffer
        do {
            buffer = try await request.body.collect(upTo: maxBodyBytes)
        } catch let error as HTTPError where error.status == .contentTooLarge {
            rejected.increment()
            return .json(.contentTooLarge, ["error": "body larger than server.max_body_bytes (\(maxBodyBytes) bytes)"])
        }
        let payload: DingTalkMessage
        do {
            payload = try DingTalkMessage.decode(Data(buffer: buffer))
        } catch {
            rejected.increment()
            return .json(.badRequest, ["error": error.description])
        }
        let message = payload.normalised(botID: settings.robotCode, receivedAt: Date())
        let key = ConversationKey(for: message, groupScope: groupScope)
        let outcome = try await inbox.accept(message, conversation: key, now: Date())
        switch outcome {
        case .accepted:
            received.increment()
            onAccepted()
        case .duplicate:
            duplicates.increment()
            logger.info("re-delivery acknowledged", metadata: ["message_id": "\(message.messageID)"])
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
