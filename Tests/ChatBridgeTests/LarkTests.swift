import ChatBridgeCore
import ChatBridgeLark
import Foundation
import Logging
import Testing

/// Feishu/Lark webhook ingress (protocols E.1, E.2): the official vectors, the challenge, every rejection
/// with nothing stored, and normalisation by the bot's open_id.
@Suite struct LarkTests {
    static let key = "test key"
    static let token = "rvaYgkND1GOiu5MM0E1rncYC6PLtF7JV"
    static let bot = "ou_bot"

    struct Rig {
        let inbox = InMemoryInbox()
        let ingress: LarkWebhookIngress

        init(encryptKey: String = LarkTests.key, token: String = LarkTests.token, groupReply: LarkSettings.GroupReply = .mention, botKnown: Bool = true) {
            let settings = LarkSettings(
                appID: "cli_app", appSecret: "secret", verificationToken: token, encryptKey: encryptKey, groupReply: groupReply)
            ingress = LarkWebhookIngress(
                settings: settings, groupScope: .user, inbox: inbox, clock: SystemClock(), botOpenID: { botKnown ? LarkTests.bot : nil },
                logger: Logger(label: "lark-test"), onAccepted: {})
        }

        /// Sends `event` as Feishu does: encrypted and signed when the rig has a key.
        func send(_ event: [String: Any], sign: Bool = true, encryptKey: String = LarkTests.key, timestamp: String = "1700000000") async throws -> LarkWebhookOutcome {
            let json = try JSONSerialization.data(withJSONObject: event)
            let body = encryptKey.isEmpty ? json : try JSONSerialization.data(withJSONObject: ["encrypt": LarkCrypto.encrypt(json, encryptKey: encryptKey)])
            let signature = sign ? LarkCrypto.signature(timestamp: timestamp, nonce: "n1", encryptKey: encryptKey, body: body) : nil
            return try await ingress.receive(body: body, timestamp: timestamp, nonce: "n1", signature: signature)
        }
    }

    static func message(
        id: String = "om_1", eventID: String = "ev_1", chatType: String = "p2p", type: String = "text", content: [String: Any] = ["text": "hello"],
        mentions: [[String: Any]] = [], thread: String? = nil, root: String? = nil, token: String = LarkTests.token
    ) -> [String: Any] {
        var message: [String: Any] = [
            "message_id": id, "chat_id": "oc_chat", "chat_type": chatType, "message_type": type, "create_time": "1609073151345",
            "content": String(decoding: try! JSONSerialization.data(withJSONObject: content), as: UTF8.self), "mentions": mentions,
        ]
        if let thread { message["thread_id"] = thread }
        if let root { message["root_id"] = root }
        return [
            "schema": "2.0",
            "header": ["event_id": eventID, "event_type": "im.message.receive_v1", "create_time": "1608725989000", "token": token, "app_id": "cli_app"],
            "event": ["sender": ["sender_id": ["open_id": "ou_user", "user_id": "e33ggbyz"], "sender_type": "user"], "message": message],
        ]
    }

    static func mention(_ key: String, _ openID: String, _ name: String) -> [String: Any] {
        ["key": key, "id": ["open_id": openID, "union_id": "on_x"], "name": name]
    }

    @Test func officialDecryptionVectorAndComputedSignature() throws {
        let plain = try LarkCrypto.decrypt("P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=", encryptKey: "test key")
        #expect(String(decoding: plain, as: UTF8.self) == "hello world")
        let body = Data(#"{"encrypt":"P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk="}"#.utf8)
        #expect(LarkCrypto.signature(timestamp: "1700000000", nonce: "abc123", encryptKey: "test key", body: body)
            == "69c61fa99760d59824d588297c0036194769fb54331682c9cbcd93e85b9a8aad")
        #expect(throws: LarkCrypto.Failure.self) { try LarkCrypto.decrypt("P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=", encryptKey: "other key") }
        #expect(throws: LarkCrypto.Failure.self) { try LarkCrypto.decrypt("not base64!", encryptKey: "test key") }
        let sealed = try LarkCrypto.encrypt(Data("round trip".utf8), encryptKey: "k")
        #expect(String(decoding: try LarkCrypto.decrypt(sealed, encryptKey: "k"), as: UTF8.self) == "round trip")
    }

    @Test func theChallengeIsAnsweredPlainOrEncryptedUnsignedButItsTokenIsChecked() async throws {
        let challenge: [String: Any] = ["challenge": "ajls384kdjxxxx", "token": Self.token, "type": "url_verification"]
        // Encrypted and unsigned, as Feishu sends it when an encrypt key is set.
        #expect(try await Rig().send(challenge, sign: false) == .challenge("ajls384kdjxxxx"))
        // Plain, with only a verification token configured.
        #expect(try await Rig(encryptKey: "").send(challenge, encryptKey: "") == .challenge("ajls384kdjxxxx"))
        var forged = challenge
        forged["token"] = "guess"
        await #expect(throws: IngressRejection(.unauthorized, "the event's verification token does not match lark.verification_token")) {
            try await Rig(encryptKey: "").send(forged, encryptKey: "")
        }
        // Encrypted and unsigned (exempt from the signature), its token is still checked.
        await #expect(throws: IngressRejection(.unauthorized, "the event's verification token does not match lark.verification_token")) {
            try await Rig().send(forged, sign: false)
        }
    }

    @Test func aSignedEncryptedMessageIsStoredOnceByMessageID() async throws {
        let rig = Rig()
        #expect(try await rig.send(Self.message()) == .stored(.accepted))
        // Feishu retries with a new event id: the message id decides.
        #expect(try await rig.send(Self.message(eventID: "ev_2")) == .stored(.duplicate))
        let rows = await rig.inbox.rows
        #expect(rows.count == 1)
        let stored = try JSONDecoder.inbox.decode(InboundMessage.self, from: rows[0].payload)
        #expect(stored.platform == "lark" && stored.botID == "cli_app" && stored.messageID == "om_1")
        #expect(stored.chat == .init(id: "oc_chat", kind: .direct))
        #expect(stored.sender.id == "ou_user" && stored.sender.staffID == "e33ggbyz")
        #expect(stored.body == .text("hello"))
        #expect(stored.sentAt == Date(timeIntervalSince1970: 1_609_073_151.345))
    }

    @Test func everyRejectionStoresNothing() async throws {
        let rig = Rig()
        func expectRejected(_ kind: IngressRejection.Kind, _ send: () async throws -> LarkWebhookOutcome) async {
            do {
                _ = try await send()
                Issue.record("accepted")
            } catch let rejection as IngressRejection {
                #expect(rejection.kind == kind, "\(rejection)")
            } catch {
                Issue.record("unexpected \(error)")
            }
        }
        await expectRejected(.unauthorized) { try await rig.send(Self.message(), sign: false) }
        // Signed over other bytes (the body was altered after signing).
        let json = try JSONSerialization.data(withJSONObject: Self.message())
        let body = try JSONSerialization.data(withJSONObject: ["encrypt": LarkCrypto.encrypt(json, encryptKey: Self.key)])
        let signature = LarkCrypto.signature(timestamp: "1", nonce: "n", encryptKey: Self.key, body: body + Data(" ".utf8))
        await expectRejected(.unauthorized) { try await rig.ingress.receive(body: body, timestamp: "1", nonce: "n", signature: signature) }
        await expectRejected(.unauthorized) { try await rig.send(Self.message(token: "wrong")) }
        // Signed and encrypted with another key: the signature fails before anything is decrypted.
        await expectRejected(.unauthorized) { try await rig.send(Self.message(), encryptKey: "another key") }
        // Unsigned and undecryptable: the same answer as any other unsigned event (no padding oracle).
        await expectRejected(.unauthorized) { try await rig.send(Self.message(), sign: false, encryptKey: "another key") }
        // Correctly signed but not decryptable: malformed.
        let garbage = Data(#"{"encrypt":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#.utf8)
        await expectRejected(.badRequest) {
            try await rig.ingress.receive(
                body: garbage, timestamp: "1", nonce: "n", signature: LarkCrypto.signature(timestamp: "1", nonce: "n", encryptKey: Self.key, body: garbage))
        }
        // Not JSON; a plain body although a key is set.
        await expectRejected(.unauthorized) { try await rig.ingress.receive(body: Data("{not json".utf8), timestamp: nil, nonce: nil, signature: nil) }
        let tokenOnly = Rig(encryptKey: "")
        await expectRejected(.badRequest) { try await tokenOnly.ingress.receive(body: Data("{not json".utf8), timestamp: nil, nonce: nil, signature: nil) }
        await expectRejected(.unauthorized) {
            try await rig.ingress.receive(body: try JSONSerialization.data(withJSONObject: Self.message()), timestamp: nil, nonce: nil, signature: nil)
        }
        // An encrypted event whose content is not a message event of the expected shape.
        await expectRejected(.badRequest) {
            var broken = Self.message()
            broken["event"] = ["message": ["message_id": "om_x"]]
            return try await rig.send(broken)
        }
        // Neither key nor token: the route accepts nothing.
        await expectRejected(.notConfigured) { try await Rig(encryptKey: "", token: "").send(Self.message(), encryptKey: "") }
        // The bot's identity is not known yet: a group message cannot be judged, so it is not stored and
        // Feishu pushes it again later.
        let unknownBot = Rig(botKnown: false)
        await expectRejected(.unavailable) {
            try await unknownBot.send(Self.message(chatType: "group", content: ["text": "@_user_1 hi"], mentions: [Self.mention("@_user_1", Self.bot, "Bot")]))
        }
        #expect(await unknownBot.inbox.rows.isEmpty)
        // A direct message does not need it.
        #expect(try await unknownBot.send(Self.message(id: "om_p2p")) == .stored(.accepted))
        #expect(await rig.inbox.rows.isEmpty)
        #expect(await tokenOnly.inbox.rows.isEmpty)
    }

    @Test func otherEventsAreAcknowledgedAndIgnored() async throws {
        let rig = Rig()
        var event = Self.message()
        event["header"] = ["event_id": "ev_9", "event_type": "im.chat.member.bot.added_v1", "token": Self.token]
        #expect(try await rig.send(event) == .ignored("im.chat.member.bot.added_v1"))
        #expect(await rig.inbox.rows.isEmpty)
    }

    @Test func inGroupsOnlyAMentionOfTheBotItselfIsAnsweredWhateverItsName() async throws {
        let rig = Rig()
        // Someone else is mentioned (even one named like the bot): not for the bot.
        let other = Self.message(id: "om_g1", chatType: "group", content: ["text": "@_user_1 hi"], mentions: [Self.mention("@_user_1", "ou_someone", "ChatBridge")])
        #expect(try await rig.send(other) == .ignored("a group message that does not mention the bot"))
        #expect(try await rig.send(Self.message(id: "om_g2", chatType: "group", content: ["text": "no mention"])) == .ignored("a group message that does not mention the bot"))
        // The bot, under any display name; its own placeholder is removed, the others become names.
        let mine = Self.message(
            id: "om_g3", chatType: "group", content: ["text": "@_user_1 ask @_user_2 and @_user_10 about it"],
            mentions: [Self.mention("@_user_1", Self.bot, "Renamed Bot"), Self.mention("@_user_2", "ou_tom", "Tom"), Self.mention("@_user_10", "ou_ann", "Ann")])
        #expect(try await rig.send(mine) == .stored(.accepted))
        let rows = await rig.inbox.rows
        #expect(rows.count == 1)
        let stored = try JSONDecoder.inbox.decode(InboundMessage.self, from: rows[0].payload)
        #expect(stored.body == .text("ask @Tom and @Ann about it"))
        #expect(stored.chat.kind == .group)
        // With group_reply: all, a group message without a mention is answered too.
        #expect(try await Rig(groupReply: .all).send(Self.message(id: "om_g4", chatType: "group", content: ["text": "anyone?"])) == .stored(.accepted))
    }

    @Test func richTextIsFlattenedWithCodeKeptAndOtherKindsAreNamed() throws {
        let post: [String: Any] = [
            "title": "Question",
            "content": [
                [["tag": "at", "user_id": "@_user_1"], ["tag": "text", "text": " why does this fail?"]],
                [["tag": "code_block", "language": "Swift", "text": "let x = 1\n    print(x)"]],
                [["tag": "img", "image_key": "img_1"], ["tag": "a", "text": "the docs", "href": "https://example.com"]],
            ],
        ]
        let settings = LarkSettings(appID: "cli_app")
        let event = try #require(LarkEventFixture.message(Self.message(chatType: "group", type: "post", content: post, mentions: [Self.mention("@_user_1", Self.bot, "Bot")])))
        let message = try #require(event.normalised(settings: settings, botOpenID: Self.bot, receivedAt: Date()))
        #expect(message.body == .text("Question\nwhy does this fail?\n```swift\nlet x = 1\n    print(x)\n```\nthe docs"))
        for (type, kind) in [("image", "image"), ("file", "file"), ("audio", "audio"), ("sticker", "sticker"), ("media", "video")] {
            let other = try #require(LarkEventFixture.message(Self.message(type: type, content: ["file_key": "f"])))
            #expect(other.normalised(settings: settings, botOpenID: Self.bot, receivedAt: Date())?.body == .unsupported(kind: kind))
        }
    }

    @Test func withReplyInThreadAThreadIsItsOwnConversation() throws {
        var settings = LarkSettings(appID: "cli_app")
        let starter = try #require(LarkEventFixture.message(Self.message(id: "om_start")))
        let inThread = try #require(LarkEventFixture.message(Self.message(id: "om_2", thread: "omt_1", root: "om_start")))
        let topic = try #require(LarkEventFixture.message(Self.message(id: "om_3", thread: "omt_9")))
        func chat(_ event: LarkMessageEvent) -> String? { event.normalised(settings: settings, botOpenID: Self.bot, receivedAt: Date())?.chat.id }
        #expect(chat(inThread) == "oc_chat")
        settings.replyInThread = true
        // The bot's answer starts a thread rooted at the question; the thread's next messages name that root.
        #expect(chat(starter) == "oc_chat#om_start")
        #expect(chat(inThread) == "oc_chat#om_start")
        #expect(chat(topic) == "oc_chat#omt_9")
    }
}

enum LarkEventFixture {
    static func message(_ event: [String: Any]) -> LarkMessageEvent? {
        guard let data = try? JSONSerialization.data(withJSONObject: event), case .message(let message, _) = try? LarkEvent.decode(data) else { return nil }
        return message
    }
}

extension JSONDecoder {
    /// How the inbox twin encodes payloads.
    static var inbox: JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .millisecondsSince1970
        return decoder
    }
}
