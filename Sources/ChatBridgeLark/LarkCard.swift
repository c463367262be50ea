import ChatBridgeCore
import Foundation
import Logging
import NIOHTTP1
import Synchronization

/// A Feishu/Lark answer that grows while the model writes.
///
/// - `cardkit` (protocols E.5): ``prepare()`` creates a CardKit card entity (JSON 2.0, streaming mode, one
///   markdown element) and its id is recorded before anything shows; ``open(resuming:)`` replies with it;
///   updates put the whole text so far into the element with a strictly increasing `sequence`; finishing
///   puts the final text and replaces the card with streaming mode closed and the summary set to the
///   start of the answer. When CardKit is refused for lack of permission the message falls back to `patch`
///   (logged once with the scope to grant).
/// - `patch` (E.4): an interactive card with `update_multi`, replaced with `PATCH` on every update.
///
/// The reply that shows the card carries a `uuid` derived from the message id, and the card's reference
/// (the entity, the message showing it) is recorded on the inbox row: a retry or a restart after a crash
/// continues the same card, never a second one. Answers longer than a card allows finish in the card and
/// continue in further replies (each with its own uuid), so nothing is cut off.
public final class LarkCard: LiveReply {
    /// What is recorded on the inbox row to find this card again.
    struct Reference: Codable, Equatable {
        enum Mode: String, Codable { case cardkit, patch }
        var mode: Mode
        /// The CardKit card entity.
        var card: String?
        /// When the entity (cardkit) or the reference (patch) was made, in Unix ms: the base of the card's
        /// `sequence` numbers, and how old the card reply's uuid is.
        var created: Int64?
        /// The message that shows the card, once it is shown.
        var message: String?

        var encoded: String { String(decoding: (try? JSONEncoder().encode(self)) ?? Data(), as: UTF8.self) }
        static func decode(_ text: String) -> Reference? { try? JSONDecoder().decode(Reference.self, from: Data(text.utf8)) }
    }

    /// Bytes of text shown in one card, counted as sent (UTF-8, escaped in JSON): a card takes 30 KB of
    /// JSON; the rest is room for its structure and summary.
    static let maxCardBytes = 28_000
    static let elementID = "markdown_1"
    /// What an empty card shows while the model has written nothing yet.
    static let placeholder = "…"

    let message: InboundMessage
    let channel: LarkReplyChannel
    private struct State {
        var reference: Reference?
        var lastSequence: Int64 = 0
        /// Streaming mode closed by itself (10 minutes): updates are skipped, the finish replaces the card.
        var streamingClosed = false
    }
    private let state: Mutex<State>

    init(message: InboundMessage, reference: Reference?, channel: LarkReplyChannel) {
        self.message = message
        self.channel = channel
        state = Mutex(State(reference: reference))
    }

    var settings: LarkSettings { channel.settings }
    var api: LarkAPI { channel.api }
    var logger: Logger { channel.logger }
    private var current: Reference? { state.withLock { $0.reference } }

    public var reference: String? { current?.encoded }

    public var updateInterval: Duration {
        // A patched message takes at most 5 updates a second.
        current?.mode == .patch ? max(settings.cardUpdateInterval, .milliseconds(200)) : settings.cardUpdateInterval
    }

    public func prepare() async throws -> String? {
        let reference = try await makeReference()
        state.withLock { $0.reference = reference }
        return reference.encoded
    }

    /// Feishu honours a reply's uuid for an hour: a card reply begun longer ago than this is not resumed
    /// (the same uuid could show a second card).
    static let uuidWindow: TimeInterval = 55 * 60

    private func makeReference() async throws -> Reference {
        let created = Int64(api.clock.now.timeIntervalSince1970 * 1000)
        guard settings.cardMode == .cardkit else { return Reference(mode: .patch, created: created) }
        do {
            let data = try await api.call(
                .POST, "/open-apis/cardkit/v1/cards",
                body: ["type": "card_json", "data": Self.cardJSON(text: Self.placeholder, streaming: true)], what: "CardKit card create")
            guard let id = data["card_id"] as? String, !id.isEmpty else {
                throw DeliveryError(isRetryable: true, reason: "CardKit card create answered without a card_id")
            }
            return Reference(mode: .cardkit, card: id, created: created)
        } catch let error as LarkAPIError where !error.isRetryable && !error.mayHaveBeenSent
            && (LarkAPIError.permissionCodes.contains(error.code) || error.httpStatus == 403)
        {
            channel.problems.error(
                "cardkit-permission",
                "CardKit cards are refused for lack of permission; answers use patched interactive cards instead. Grant the scope cardkit:card:write (Permissions & Scopes) and publish a version, or set lark.card.mode: patch",
                metadata: ["error": "\(error)"])
            return Reference(mode: .patch, created: created)
        } catch let error as LarkAPIError {
            throw error.delivery
        }
    }

    public func open(resuming: Bool) async throws {
        var reference: Reference
        if let current {
            reference = current
        } else if resuming, settings.cardMode == .cardkit {
            // An earlier attempt may have shown a card whose entity this one does not know: a new entity
            // sent under the same uuid would never be seen. The answer goes out as a message instead.
            throw DeliveryError(isRetryable: false, reason: "the card an earlier attempt may have shown is not recorded")
        } else {
            reference = try await makeReference()
            state.withLock { $0.reference = reference }
        }
        if resuming, reference.mode == .patch, reference.message == nil, let created = reference.created,
            api.clock.now.timeIntervalSince1970 - Double(created) / 1000 > Self.uuidWindow
        {
            // A CardKit entity can be sent only once, so only a patched card could show twice.
            throw DeliveryError(isRetryable: false, reason: "the card reply began over 55 minutes ago, beyond Feishu's one-hour uuid window; not shown again")
        }
        let content: [String: Any]
        switch reference.mode {
        case .cardkit:
            content = ["type": "card", "data": ["card_id": reference.card ?? ""]]
        case .patch:
            content = Self.patchCard(text: Self.placeholder)
        }
        do {
            // Resuming, the same uuid makes Feishu return the card an earlier attempt may have shown.
            let shown = try await channel.reply(to: message, type: "interactive", content: content, uuid: LarkReplyChannel.uuid(message: message, salt: "card"))
            if !shown.isEmpty { reference.message = shown }
            if reference.mode == .patch, reference.message == nil {
                // Feishu reports the uuid used (200770) without the message: the card cannot be patched.
                throw DeliveryError(isRetryable: false, reason: "the card reply answered without a message_id")
            }
            state.withLock { $0.reference = reference }
        } catch let error as LarkAPIError {
            if !error.isRetryable, !error.mayHaveBeenSent {
                channel.problems.error("card-refused-\(error.code)", "Feishu refused a card reply; such answers are sent as text", metadata: ["error": "\(error)"])
            }
            throw error.delivery
        }
    }

    public func update(_ text: String) async throws {
        try await show(Self.visible(text), final: false)
    }

    public func finish(_ text: String) async throws {
        try await complete(text)
    }

    public func fail(_ text: String) async throws {
        try await complete(text)
    }

    /// Shows the first part of `text` in the card, closed, then sends the rest as further replies.
    private func complete(_ text: String) async throws {
        let parts = LarkReplyChannel.numberedParts(of: text, maxBytes: Self.maxCardBytes)
        try await show(parts.first ?? text, final: true)
        for part in parts.dropFirst() {
            try await channel.deliver(part: part, replyingTo: message)
        }
    }

    private func show(_ text: String, final: Bool) async throws {
        guard let reference = current else {
            throw DeliveryError(isRetryable: false, reason: "the card is not known (no reference was recorded for it)")
        }
        let shown = text.isEmpty ? Self.placeholder : text
        do {
            switch reference.mode {
            case .cardkit:
                guard let card = reference.card else { throw DeliveryError(isRetryable: false, reason: "the CardKit card id is missing") }
                try await streamContent(shown, card: card, reference: reference)
                if final {
                    try await withSequence(reference) { sequence in
                        try await api.call(
                            .PUT, "/open-apis/cardkit/v1/cards/\(LarkReplyChannel.pathSegment(card))",
                            body: ["card": ["type": "card_json", "data": Self.cardJSON(text: shown, streaming: false)], "sequence": sequence],
                            what: "CardKit card close")
                    }
                }
            case .patch:
                guard let id = reference.message else { throw DeliveryError(isRetryable: false, reason: "the card's message id is missing") }
                let card = Self.patchCard(text: shown)
                let json = String(decoding: try JSONSerialization.data(withJSONObject: card), as: UTF8.self)
                try await api.call(.PATCH, "/open-apis/im/v1/messages/\(LarkReplyChannel.pathSegment(id))", body: ["content": json], what: "card patch")
            }
        } catch let error as LarkAPIError {
            throw error.delivery
        }
    }

    /// Puts the whole text so far into the card's element, unless streaming mode closed by itself.
    private func streamContent(_ text: String, card: String, reference: Reference) async throws {
        guard !state.withLock({ $0.streamingClosed }) else { return }
        do {
            try await withSequence(reference) { sequence in
                try await api.call(
                    .PUT, "/open-apis/cardkit/v1/cards/\(LarkReplyChannel.pathSegment(card))/elements/\(Self.elementID)/content",
                    body: ["content": text, "sequence": sequence], what: "CardKit content update")
            }
        } catch let error as LarkAPIError where error.code == 300309 || error.code == 200850 {
            // Streaming mode closes 10 minutes after the card was made; the closing update shows the text.
            state.withLock { $0.streamingClosed = true }
            logger.notice("the card's streaming mode closed by itself; its final text is shown when the answer is done", metadata: ["message_id": "\(message.messageID)"])
        }
    }

    /// Runs one card operation with the next `sequence`. The numbers rise with the time since the card was
    /// made (hundredths of a second), so an attempt after a restart continues above every number an earlier
    /// attempt used. A refusal for a low sequence (300317: this host's clock is behind the one that made
    /// the earlier updates) is tried again with ever larger jumps, up to about a day of clock difference.
    private func withSequence(_ reference: Reference, _ operation: (Int64) async throws -> Void) async throws {
        let base = reference.created ?? 0
        let elapsed = max(Int64(api.clock.now.timeIntervalSince1970 * 1000) - base, 0) / 10
        var sequence = state.withLock { state -> Int64 in
            state.lastSequence = min(max(state.lastSequence + 1, elapsed + 1), Int64(Int32.max))
            return state.lastSequence
        }
        for jump in Self.sequenceJumps {
            do {
                return try await operation(sequence)
            } catch let error as LarkAPIError where error.code == 300317 {
                logger.debug("card sequence refused; trying a higher one", metadata: ["error": "\(error)"])
                sequence = state.withLock { state -> Int64 in
                    state.lastSequence = min(state.lastSequence + jump, Int64(Int32.max))
                    return state.lastSequence
                }
            }
        }
        try await operation(sequence)
    }

    /// How far a refused sequence jumps, one after the other (hundredths of a second: 10 s, 17 min, 28 h).
    static let sequenceJumps: [Int64] = [1_000, 100_000, 10_000_000]

    /// The text a streaming card shows: at most what one card holds.
    static func visible(_ text: String) -> String {
        let shown = LarkReplyChannel.splitter(maxBytes: maxCardBytes - 3).prefix(text)
        return shown.endIndex == text.endIndex ? text : shown + "…"
    }

    /// A JSON 2.0 card with one markdown element; while streaming, the summary is Feishu's default, after
    /// that the start of the answer.
    static func cardJSON(text: String, streaming: Bool) -> String {
        var config: [String: Any] = ["streaming_mode": streaming]
        if streaming {
            config["streaming_config"] = ["print_frequency_ms": ["default": 70], "print_step": ["default": 1], "print_strategy": "fast"]
        } else {
            let firstLine = text.split(whereSeparator: \.isNewline).first.map(String.init) ?? text
            config["summary"] = ["content": String(firstLine.prefix(60))]
        }
        let card: [String: Any] = [
            "schema": "2.0", "config": config,
            "body": ["elements": [["tag": "markdown", "content": text, "element_id": elementID]]],
        ]
        return String(decoding: (try? JSONSerialization.data(withJSONObject: card)) ?? Data(), as: UTF8.self)
    }

    /// An interactive JSON 1.0 card that can be patched (`update_multi` declared).
    static func patchCard(text: String) -> [String: Any] {
        ["config": ["wide_screen_mode": true, "update_multi": true], "elements": [["tag": "markdown", "content": text]]]
    }
}
