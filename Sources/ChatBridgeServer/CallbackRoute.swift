import ChatBridgeCore
import Foundation
import Hummingbird
import Logging
import NIOCore
import NIOFoundationCompat

/// What every platform's callback route shares: the body capped at `server.max_body_bytes` (413), an
/// ``IngressRejection`` answered with its status (401, 400, 503), and a message that could not be stored
/// answered 503 so the platform delivers it again. Nothing is stored in any of these cases.
struct CallbackRoute: Sendable {
    /// How the platform is named in the log ("DingTalk", "Lark").
    let platform: String
    let maxBodyBytes: Int
    let logger: Logger
    /// Counts and logs a body refused for its size (the ingress's own rejection counter).
    let noteTooLarge: @Sendable (String) -> Void

    private struct TooLarge: Error {}

    /// The request body, at most `maxBodyBytes`; a larger one ends ``answer(_:)`` with 413.
    func body(of request: Request) async throws -> Data {
        do {
            return Data(buffer: try await request.body.collect(upTo: maxBodyBytes))
        } catch is NIOTooManyBytesError {
            throw TooLarge()
        }
    }

    /// Runs `handle` and turns what it throws into the HTTP answer.
    func answer(_ handle: () async throws -> Response) async -> Response {
        do {
            return try await handle()
        } catch is TooLarge {
            noteTooLarge("body larger than server.max_body_bytes")
            return .json(.contentTooLarge, ["error": "body larger than server.max_body_bytes (\(maxBodyBytes) bytes)"])
        } catch let rejection as IngressRejection {
            switch rejection.kind {
            case .unauthorized: return .json(.unauthorized, ["error": rejection.reason])
            case .badRequest: return .json(.badRequest, ["error": rejection.reason])
            case .notConfigured, .unavailable: return .json(.serviceUnavailable, ["error": rejection.reason])
            }
        } catch {
            // Not stored, so not acknowledged: the platform delivers it again.
            logger.error("could not store a \(platform) message; answering 503", metadata: ["error": "\(error)"])
            return .json(.serviceUnavailable, ["error": "the message could not be stored; deliver it again later"])
        }
    }
}

extension Response {
    static func json(_ status: HTTPResponse.Status, _ object: [String: String]) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(data: data)))
    }
}
