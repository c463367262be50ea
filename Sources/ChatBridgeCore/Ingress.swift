import Foundation
import Logging
import Metrics

/// Why an ingress refused a delivery, and what the transport should answer. Nothing is stored in any case.
public struct IngressRejection: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// Not from the platform, or not for this bot: HTTP 401.
        case unauthorized
        /// Malformed: HTTP 400.
        case badRequest
        /// The bot is not configured to accept it yet: HTTP 503.
        case notConfigured
        /// Not storable right now; the platform delivers it again later: HTTP 503, no acknowledgement.
        case unavailable
    }
    public var kind: Kind
    public var reason: String
    public init(_ kind: Kind, _ reason: String) {
        self.kind = kind
        self.reason = reason
    }
    public var description: String { reason }
}

/// The part every platform's ingress shares once a message is authentic and normalised: store it in the
/// inbox under its conversation, count it (`chatbridge_messages_received_total`,
/// `…_deduplicated_total`, `chatbridge_callbacks_rejected_total`, labelled by platform) and wake the
/// dispatcher for a new one.
public struct InboxIntake: Sendable {
    private let platform: String
    private let groupScope: GroupScope
    private let inbox: any Inbox
    private let clock: any WallClock
    private let onAccepted: @Sendable () -> Void
    private let logger: Logger
    private let received: Counter
    private let duplicates: Counter
    private let rejected: Counter

    public init(
        platform: String, groupScope: GroupScope, inbox: any Inbox, clock: any WallClock, metrics: any MetricsFactory, logger: Logger,
        onAccepted: @escaping @Sendable () -> Void
    ) {
        self.platform = platform
        self.groupScope = groupScope
        self.inbox = inbox
        self.clock = clock
        self.onAccepted = onAccepted
        self.logger = logger
        received = Counter(label: "chatbridge_messages_received_total", dimensions: [("platform", platform)], factory: metrics)
        duplicates = Counter(label: "chatbridge_messages_deduplicated_total", dimensions: [("platform", platform)], factory: metrics)
        rejected = Counter(label: "chatbridge_callbacks_rejected_total", dimensions: [("platform", platform)], factory: metrics)
    }

    /// Stores `message` once; returns only after the commit. Throws when the inbox could not store it.
    public func accept(_ message: InboundMessage) async throws -> AcceptOutcome {
        let outcome = try await inbox.accept(message, conversation: ConversationKey(for: message, groupScope: groupScope), now: clock.now)
        switch outcome {
        case .accepted:
            received.increment()
            onAccepted()
        case .duplicate:
            duplicates.increment()
            logger.info("re-delivery acknowledged", metadata: ["platform": "\(platform)", "message_id": "\(message.messageID)"])
        }
        return outcome
    }

    /// Counts and logs a refused delivery, and returns the rejection to throw.
    public func reject(_ kind: IngressRejection.Kind, _ reason: String) -> IngressRejection {
        rejected.increment()
        logger.notice("rejected \(platform) callback", metadata: ["reason": "\(reason)"])
        return IngressRejection(kind, reason)
    }
}
